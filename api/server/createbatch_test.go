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

// orderedKV lets the first two transactions with compares (the first two
// batches of a group commit) reach etcd in a chosen order: the first is
// held until the second has been sent, so both are in flight at once;
// then, with secondFirst, the second goes first.
type orderedKV struct {
	clientv3.KV
	t           *testing.T
	secondFirst bool

	mu                    sync.Mutex
	seen                  int
	secondSent, firstDone chan struct{}
	secondDone            chan struct{}
}

func newOrderedKV(t *testing.T, kv clientv3.KV, secondFirst bool) *orderedKV {
	return &orderedKV{KV: kv, t: t, secondFirst: secondFirst,
		secondSent: make(chan struct{}), firstDone: make(chan struct{}), secondDone: make(chan struct{})}
}

func (k *orderedKV) Txn(ctx context.Context) clientv3.Txn {
	return &orderedTxn{Txn: k.KV.Txn(ctx), k: k}
}

type orderedTxn struct {
	clientv3.Txn
	k       *orderedKV
	compare bool
}

func (t *orderedTxn) If(cs ...clientv3.Cmp) clientv3.Txn {
	t.compare = len(cs) > 0
	t.Txn = t.Txn.If(cs...)
	return t
}

func (t *orderedTxn) Then(ops ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Then(ops...); return t }
func (t *orderedTxn) Else(ops ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Else(ops...); return t }

func (t *orderedTxn) Commit() (*clientv3.TxnResponse, error) {
	k := t.k
	if !t.compare {
		return t.Txn.Commit()
	}
	k.mu.Lock()
	k.seen++
	n := k.seen
	k.mu.Unlock()
	wait := func(c chan struct{}, what string) {
		select {
		case <-c:
		case <-time.After(30 * time.Second): // a guard against a hang, not a timing
			k.t.Errorf("%s never happened: the batcher did not have two batches in flight", what)
		}
	}
	switch n {
	case 1:
		wait(k.secondSent, "the second batch's send")
		if k.secondFirst {
			wait(k.secondDone, "the second batch's commit")
		}
		defer close(k.firstDone)
	case 2:
		close(k.secondSent)
		if !k.secondFirst {
			wait(k.firstDone, "the first batch's commit")
		}
		defer close(k.secondDone)
	}
	return t.Txn.Commit()
}

// TestGroupCommitOvertakenBatchCommits: two batches are in flight and the
// second, charged on the usage as the first leaves it, reaches etcd first
// and fails its usage compare. Once the first has committed, the second's
// creates are sent again and commit: every create succeeds and the usage
// counts each once.
func TestGroupCommitOvertakenBatchCommits(t *testing.T) {
	w := newBatchWorld(t)
	w.cli.KV = newOrderedKV(t, w.cli.KV, true)
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
	w.cli.KV = newOrderedKV(t, w.cli.KV, false)
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
