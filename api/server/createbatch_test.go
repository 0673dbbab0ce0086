package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// batchWorld is what the creates of a group commit refer to, in a real
// etcd, and a batcher over it (these tests drive commitBatch directly, as
// run does, to see each create's answer).
type batchWorld struct {
	cli *clientv3.Client
	b   *createBatcher
	rev int64 // of the flavor, image and network, written together
}

func newBatchWorld(t *testing.T) *batchWorld {
	t.Helper()
	_, cli := etcdtest.Start(t)
	w := &batchWorld{cli: cli, b: newCreateBatcher(&Server{etcd: cli})}
	w.rev = w.write(t,
		putOf(t, store.FlavorKey("small"), &minicloudv1.Flavor{Meta: &minicloudv1.ObjectMeta{Name: "small"}, Vcpus: 1, MemoryMib: 512, DiskGib: 1}),
		putOf(t, store.ImageKey("tiny"), &minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Name: "tiny"}}),
		putOf(t, store.NetworkKey("p", "default"), &minicloudv1.Network{Meta: &minicloudv1.ObjectMeta{Id: "net-1", Name: "default", Project: "p"}, Cidr: "10.0.0.0/24"}),
	)
	return w
}

func putOf(t *testing.T, key string, m proto.Message) clientv3.Op {
	t.Helper()
	op, err := store.PutOp(key, m)
	if err != nil {
		t.Fatal(err)
	}
	return op
}

// write commits ops in one transaction, as another replica would, and
// returns its revision.
func (w *batchWorld) write(t *testing.T, ops ...clientv3.Op) int64 {
	t.Helper()
	resp, err := w.cli.Txn(context.Background()).Then(ops...).Commit()
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// pending is a create of VM vm-<i> at 10.0.0.<i+2>, as tryCreateVM
// hands it to the batcher.
func (w *batchWorld) pending(i int) *pendingCreate {
	id := fmt.Sprintf("vm-%d", i)
	nv := store.NewVM{
		VM: &minicloudv1.VM{
			Meta: &minicloudv1.ObjectMeta{Id: id, Name: id, Project: "p"},
			Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "small", Networks: []string{"default"}, Resources: &minicloudv1.Resources{Vcpus: 1, MemoryMib: 512, DiskGib: 1}},
			Status: &minicloudv1.VMStatus{Phase: lifecycle.Pending, Addresses: []*minicloudv1.VMAddress{
				{Network: "default", Ip: fmt.Sprintf("10.0.0.%d", i+2)},
			}},
		},
		Event:     &minicloudv1.Event{Type: lifecycle.EventNormal, Reason: lifecycle.ReasonCreated},
		FlavorRev: w.rev, ImageRev: w.rev,
		Networks: []store.NetworkRef{{ID: "net-1", Rev: w.rev}},
		Now:      time.Now(),
	}
	return &pendingCreate{ctx: context.Background(), nv: nv, done: make(chan createResult, 1)}
}

// commit queues n creates with q and runs the batcher until its queue
// is empty, as commit does when the first create finds it idle, and
// returns each create's answer.
func (w *batchWorld) commit(t *testing.T, q *projectCreates, n int) []createResult {
	t.Helper()
	batch := make([]*pendingCreate, n)
	for i := range batch {
		batch[i] = w.pending(i)
	}
	q.pending, q.running = slices.Clone(batch), true
	w.b.projects["p"] = q
	w.b.run("p", q)
	out := make([]createResult, n)
	for i, p := range batch {
		select {
		case out[i] = <-p.done:
		default:
			t.Fatalf("create %d not answered", i)
		}
	}
	return out
}

func (w *batchWorld) usage(t *testing.T) *minicloudv1.QuotaUsage {
	t.Helper()
	u, err := store.ReadUsage(context.Background(), w.cli, "p")
	if err != nil {
		t.Fatal(err)
	}
	return u.Usage
}

// TestGroupCommitRetriesOnlyTheLosers: of a batch of three creates, the
// second's name and the third's address were taken behind this replica's
// create cache (by another replica), so the batch's transaction fails.
// Only those two are sent back to re-read (errRetry); the first commits
// in the next transaction, without a read of its own, charged alone.
func TestGroupCommitRetriesOnlyTheLosers(t *testing.T) {
	w := newBatchWorld(t)
	ctx := context.Background()
	w.write(t, clientv3.OpPut(store.VMNameKey("p", "vm-1"), "other"), clientv3.OpPut(store.IPAMKey("net-1", "10.0.0.4"), "other"))
	res := w.commit(t, &projectCreates{}, 3)
	if res[0].err != nil || res[0].rev == 0 {
		t.Fatalf("first create: %+v, want committed", res[0])
	}
	for _, i := range []int{1, 2} {
		if !errors.Is(res[i].err, errRetry) {
			t.Fatalf("create %d: %+v, want errRetry", i, res[i])
		}
	}
	if _, err := store.GetVM(ctx, w.cli, "vm-0"); err != nil {
		t.Fatalf("vm-0: %v", err)
	}
	for _, id := range []string{"vm-1", "vm-2"} {
		if _, err := store.GetVM(ctx, w.cli, id); err == nil {
			t.Fatalf("%s stored", id)
		}
	}
	if u := w.usage(t); u.GetInstances() != 1 || u.GetVcpus() != 1 {
		t.Fatalf("usage %v, want the one VM that committed", u)
	}
}

// TestGroupCommitDecidesAgainOnMovedUsage: this replica's idea of the
// project's usage is stale (another replica charged two VMs since), so
// the batch's transaction fails on the usage key alone; no create is
// sent back to re-read: all three commit together in the next
// transaction, charged on the usage as it is now.
func TestGroupCommitDecidesAgainOnMovedUsage(t *testing.T) {
	w := newBatchWorld(t)
	ctx := context.Background()
	stale, err := store.ReadCountedUsage(ctx, w.cli, "p")
	if err != nil {
		t.Fatal(err)
	}
	w.write(t, putOf(t, store.QuotaUsageKey("p"), &minicloudv1.QuotaUsage{Instances: 2, Vcpus: 2, MemoryMib: 1024, DiskGib: 2}))
	res := w.commit(t, &projectCreates{usage: stale, known: true}, 3)
	for i, r := range res {
		if r.err != nil || r.rev != res[0].rev {
			t.Fatalf("create %d: %+v, want committed with the others at revision %d", i, r, res[0].rev)
		}
	}
	if u := w.usage(t); u.GetInstances() != 5 || u.GetVcpus() != 5 {
		t.Fatalf("usage %v, want the other replica's 2 and these 3", u)
	}
}

// scriptedKV runs a hook before and after each transaction with compares
// (the batches' commits), so a test can make them reach etcd, and come
// back, in a chosen order. A commit is named by its batch (1: the one
// that creates vm-0, 2: any other) and its attempt (1, 2, ...). It counts
// the transactions without compares (reads) sent after the first commit.
type scriptedKV struct {
	clientv3.KV
	steps map[commitAttempt]scriptStep

	mu       sync.Mutex
	attempts map[int]int
	reads    int
}

type commitAttempt struct{ batch, attempt int }

type scriptStep struct{ before, after func() }

func (k *scriptedKV) Txn(ctx context.Context) clientv3.Txn {
	return &scriptedTxn{Txn: k.KV.Txn(ctx), k: k}
}

type scriptedTxn struct {
	clientv3.Txn
	k       *scriptedKV
	compare bool
	batch   int
}

func (t *scriptedTxn) If(cs ...clientv3.Cmp) clientv3.Txn {
	t.compare, t.batch = len(cs) > 0, 2
	for _, c := range cs {
		if string(c.KeyBytes()) == store.VMNameKey("p", "vm-0") {
			t.batch = 1
		}
	}
	t.Txn = t.Txn.If(cs...)
	return t
}

func (t *scriptedTxn) Then(ops ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Then(ops...); return t }
func (t *scriptedTxn) Else(ops ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Else(ops...); return t }

func (t *scriptedTxn) Commit() (*clientv3.TxnResponse, error) {
	k := t.k
	k.mu.Lock()
	if !t.compare {
		if len(k.attempts) > 0 {
			k.reads++
		}
		k.mu.Unlock()
		return t.Txn.Commit()
	}
	if k.attempts == nil {
		k.attempts = map[int]int{}
	}
	k.attempts[t.batch]++
	step := k.steps[commitAttempt{t.batch, k.attempts[t.batch]}]
	k.mu.Unlock()
	if step.before != nil {
		step.before()
	}
	resp, err := t.Txn.Commit()
	if step.after != nil {
		step.after()
	}
	return resp, err
}

// awaitClosed waits for c; the deadline guards against a hang, it times
// nothing.
func awaitClosed(t *testing.T, c <-chan struct{}, what string) {
	select {
	case <-c:
	case <-time.After(30 * time.Second):
		t.Errorf("%s never happened", what)
	}
}

// TestGroupCommitOvertakenBatchCommits: two batches are in flight and the
// second, charged on the usage as the first leaves it, reaches etcd first
// and fails its usage compare. Its creates are sent again (the same
// transaction at once, racing the first, or after it) and commit: every
// create succeeds and the usage counts each once.
func TestGroupCommitOvertakenBatchCommits(t *testing.T) {
	w := newBatchWorld(t)
	secondDone := make(chan struct{})
	w.cli.KV = &scriptedKV{KV: w.cli.KV, steps: map[commitAttempt]scriptStep{
		{1, 1}: {before: func() { awaitClosed(t, secondDone, "the second batch's commit") }},
		{2, 1}: {after: func() { close(secondDone) }},
	}}
	const n = 2*maxBatch + 2
	res := w.commit(t, &projectCreates{}, n)
	revs := map[int64]bool{}
	for i, r := range res {
		if r.err != nil {
			t.Fatalf("create %d: %v", i, r.err)
		}
		revs[r.rev] = true
	}
	if len(revs) < 2 {
		t.Fatalf("%d creates in %d transactions", n, len(revs))
	}
	if u := w.usage(t); u.GetInstances() != n {
		t.Fatalf("usage %v, want %d instances", u, n)
	}
}

// TestGroupCommitFailedBatchFailsTheNext: two batches are in flight, the
// first has a create whose name another replica took, so it fails, and
// the second, charged on the usage as the first would have left it,
// fails too. Only the create that lost is sent back to re-read; every
// other create of both batches commits, and the usage counts them.
func TestGroupCommitFailedBatchFailsTheNext(t *testing.T) {
	w := newBatchWorld(t)
	w.write(t, clientv3.OpPut(store.VMNameKey("p", "vm-1"), "other"))
	secondSent, firstDone := make(chan struct{}), make(chan struct{})
	w.cli.KV = &scriptedKV{KV: w.cli.KV, steps: map[commitAttempt]scriptStep{
		{1, 1}: {before: func() { awaitClosed(t, secondSent, "the second batch's send") }, after: func() { close(firstDone) }},
		{2, 1}: {before: func() {
			close(secondSent)
			awaitClosed(t, firstDone, "the first batch's commit")
		}},
	}}
	const n = 2*maxBatch + 2
	res := w.commit(t, &projectCreates{}, n)
	for i, r := range res {
		if i == 1 {
			if !errors.Is(r.err, errRetry) {
				t.Fatalf("create 1: %+v, want errRetry", r)
			}
			continue
		}
		if r.err != nil {
			t.Fatalf("create %d: %v", i, r.err)
		}
	}
	if u := w.usage(t); u.GetInstances() != n-1 {
		t.Fatalf("usage %v, want %d instances", u, n-1)
	}
}

// TestGroupCommitFillsATransaction: creates of the largest shape (a server
// group, a request id, user data, a network, an event) fill a batch to
// etcd's default limit of compares and writes (store.CreateVMSize) and no
// further: etcd takes every batch, and the first carries as many creates
// as the limit allows.
func TestGroupCommitFillsATransaction(t *testing.T) {
	w := newBatchWorld(t)
	w.write(t, putOf(t, store.ServerGroupKey("p", "g"), &minicloudv1.ServerGroup{Meta: &minicloudv1.ObjectMeta{Name: "g", Project: "p"}}))
	const n = 2 * maxBatch
	batch := make([]*pendingCreate, n)
	for i := range batch {
		p := w.pending(i)
		p.nv.VM.Spec.ServerGroup = "g"
		p.nv.RequestID, p.nv.UserData = fmt.Sprintf("req-%d", i), []byte("#cloud-config\n")
		batch[i] = p
	}
	q := &projectCreates{pending: slices.Clone(batch), running: true}
	w.b.projects["p"] = q
	w.b.run("p", q)
	perRev := map[int64]int{}
	first := int64(0)
	for i, p := range batch {
		r := <-p.done
		if r.err != nil {
			t.Fatalf("create %d: %v", i, r.err)
		}
		perRev[r.rev]++
		if i == 0 {
			first = r.rev
		}
	}
	c, o := store.CreateVMSize(batch[0].nv)
	if want := min((store.MaxTxnOps-2)/c, (store.MaxTxnOps-1)/o); perRev[first] != want {
		t.Fatalf("creates per transaction %v, want the first to carry %d", perRev, want)
	}
}

// commitTwoBatches queues two full batches of creates with kv scripting
// their commits, runs the batcher until its queue is empty, and checks
// that every create committed, the usage counts each once, and no read
// was needed after the first commit was sent.
func (w *batchWorld) commitTwoBatches(t *testing.T, kv *scriptedKV, first *pendingCreate) {
	t.Helper()
	w.cli.KV = kv
	c, o := store.CreateVMSize(first.nv)
	n := 2 * min((store.MaxTxnOps-2)/c, (store.MaxTxnOps-1)/o)
	batch := []*pendingCreate{first}
	for i := 1; i < n; i++ {
		batch = append(batch, w.pending(i))
	}
	q := &projectCreates{pending: slices.Clone(batch), running: true}
	w.b.projects["p"] = q
	w.b.run("p", q)
	revs := map[int64]int{}
	for i, p := range batch {
		r := <-p.done
		if r.err != nil {
			t.Fatalf("create %d: %v", i, r.err)
		}
		revs[r.rev]++
	}
	if len(revs) != 2 {
		t.Fatalf("creates per revision %v, want two transactions", revs)
	}
	if kv.reads != 0 {
		t.Fatalf("%d reads after the first commit, want none: an overtaken batch is sent again as it was", kv.reads)
	}
	if u := w.usage(t); u.GetInstances() != int64(n) {
		t.Fatalf("usage %v, want %d instances", u, n)
	}
}

// TestGroupCommitOvertakenBatchResentAtOnce: the second of two batches in
// flight reaches etcd first and fails its usage compare. Its transaction
// is sent again while the first is still in flight (the first is held
// until the resend has been sent, so a batcher that waited for the first
// would hang here) and commits after it, with no read.
func TestGroupCommitOvertakenBatchResentAtOnce(t *testing.T) {
	w := newBatchWorld(t)
	secondDone, resendSent, firstDone := make(chan struct{}), make(chan struct{}), make(chan struct{})
	kv := &scriptedKV{KV: w.cli.KV, steps: map[commitAttempt]scriptStep{
		{1, 1}: {before: func() {
			awaitClosed(t, secondDone, "the second batch's commit")
			awaitClosed(t, resendSent, "the second batch's resend while the first is in flight")
		}, after: func() { close(firstDone) }},
		{2, 1}: {after: func() { close(secondDone) }},
		{2, 2}: {before: func() {
			close(resendSent)
			awaitClosed(t, firstDone, "the first batch's commit")
		}},
	}}
	w.commitTwoBatches(t, kv, w.pending(0))
}

// TestGroupCommitOvertakenBatchAnsweredLate: the second batch reaches etcd
// first and fails, but its answer comes back after the first batch has
// committed and been answered. The failure's revision, older than the
// first's commit, says it only overtook: it is sent again as it was, with
// no read, and commits.
func TestGroupCommitOvertakenBatchAnsweredLate(t *testing.T) {
	w := newBatchWorld(t)
	first := w.pending(0)
	secondApplied := make(chan struct{})
	kv := &scriptedKV{KV: w.cli.KV, steps: map[commitAttempt]scriptStep{
		{1, 1}: {before: func() { awaitClosed(t, secondApplied, "the second batch's commit") }},
		{2, 1}: {after: func() {
			close(secondApplied)
			// Hold the answer until run has answered the first batch's
			// creates. The wait polls (run's answer is a channel this
			// test must not drain); it does not time anything.
			for deadline := time.Now().Add(30 * time.Second); len(first.done) == 0; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Errorf("the first batch was never answered")
					return
				}
			}
		}},
	}}
	w.commitTwoBatches(t, kv, first)
}

// TestGroupCommitChargesOnTheUsageARemovalLeft: a VM's removal on this
// replica gives its share back (the usage key changes outside the
// batcher) and hands the usage it wrote to the batcher, so the project's
// next create commits in one transaction, with no failed charge and no
// read; before, every create after a delete failed its usage compare and
// paid a check read and a second commit.
func TestGroupCommitChargesOnTheUsageARemovalLeft(t *testing.T) {
	w := newBatchWorld(t)
	ctx := context.Background()
	q := &projectCreates{}
	if res := w.commit(t, q, 1); res[0].err != nil {
		t.Fatalf("first create: %v", res[0].err)
	}
	vm, err := store.GetVM(ctx, w.cli, "vm-0")
	if err != nil {
		t.Fatal(err)
	}
	txn, err := store.RemoveVMTxn(ctx, w.cli, vm)
	if err != nil {
		t.Fatal(err)
	}
	if txn.Usage == nil {
		t.Fatal("the removal does not say what usage it writes")
	}
	rev, ok, err := txn.Commit(ctx, w.cli)
	if err != nil || !ok {
		t.Fatalf("remove vm-0: ok %v, %v", ok, err)
	}
	w.b.usageWritten(*txn.Usage, rev)

	kv := &scriptedKV{KV: w.cli.KV}
	w.cli.KV = kv
	if res := w.commit(t, q, 1); res[0].err != nil {
		t.Fatalf("create after the removal: %v", res[0].err)
	}
	if kv.attempts[1] != 1 || kv.reads != 0 {
		t.Fatalf("create after the removal: %d transactions and %d reads, want 1 and 0", kv.attempts[1], kv.reads)
	}
	if u := w.usage(t); u.GetInstances() != 1 || u.GetVcpus() != 1 {
		t.Fatalf("usage %v, want the one VM there is", u)
	}
}

// TestGroupCommitIgnoresAnOlderRemovalUsage: a removal's usage that a
// batch of the batcher's committed after is not taken over the batch's.
func TestGroupCommitIgnoresAnOlderRemovalUsage(t *testing.T) {
	w := newBatchWorld(t)
	ctx := context.Background()
	q := &projectCreates{}
	if res := w.commit(t, q, 1); res[0].err != nil {
		t.Fatalf("first create: %v", res[0].err)
	}
	stale, err := store.ReadCountedUsage(ctx, w.cli, "p")
	if err != nil {
		t.Fatal(err)
	}
	// Older than the create above, which q.usageRev holds.
	w.b.usageWritten(stale.Released(&minicloudv1.QuotaUsage{Instances: 1, Vcpus: 1, MemoryMib: 512, DiskGib: 1}), q.usageRev-1)
	kv := &scriptedKV{KV: w.cli.KV}
	w.cli.KV = kv
	p := w.pending(1)
	q.pending, q.running = []*pendingCreate{p}, true
	w.b.run("p", q)
	if r := <-p.done; r.err != nil {
		t.Fatalf("second create: %v", r.err)
	}
	if kv.attempts[2] != 1 || kv.reads != 0 {
		t.Fatalf("%d transactions and %d reads, want 1 and 0", kv.attempts[2], kv.reads)
	}
	if u := w.usage(t); u.GetInstances() != 2 {
		t.Fatalf("usage %v, want 2 instances", u)
	}
}
