package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
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

// commit runs one commitBatch of n creates with q and returns each
// create's answer.
func (w *batchWorld) commit(t *testing.T, q *projectCreates, n int) []createResult {
	t.Helper()
	batch := make([]*pendingCreate, n)
	for i := range batch {
		batch[i] = w.pending(i)
	}
	// commitBatch filters its batch in place, as run hands it a slice
	// of the queue nobody else reads.
	if later := w.b.commitBatch(context.Background(), "p", q, slices.Clone(batch)); len(later) > 0 {
		t.Fatalf("%d creates left for a later batch", len(later))
	}
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
