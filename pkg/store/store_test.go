package store_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

func TestVMSpecAndStatusMerge(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	vm := &minicloudv1.VM{
		Meta:   &minicloudv1.ObjectMeta{Id: "id-1", Name: "web1", Project: "default", ResourceVersion: 99},
		Spec:   &minicloudv1.VMSpec{Image: "debian", Flavor: "small"},
		Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING}, // must not be stored with the spec
	}
	specOp, err := store.VMSpecOp(vm)
	if err != nil {
		t.Fatal(err)
	}
	statusOp, err := store.VMStatusOp("id-1", &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_PENDING})
	if err != nil {
		t.Fatal(err)
	}
	rev, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{store.Absent(store.VMSpecKey("id-1"))}, []clientv3.Op{specOp, statusOp})
	if err != nil || !ok {
		t.Fatalf("commit: %v %v", ok, err)
	}
	if vm.Meta.ResourceVersion != 99 {
		t.Fatal("VMSpecOp modified its argument")
	}
	got, err := store.GetVM(ctx, cli, "id-1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Meta.ResourceVersion != rev || got.Status.StatusVersion != rev || got.Status.Phase != minicloudv1.VMPhase_VM_PHASE_PENDING || got.Spec.Image != "debian" {
		t.Fatalf("merged VM %v, want both versions %d and PENDING", got, rev)
	}
	// A status write moves only the status version. The status written
	// carries the version it was read at: stored without it, and left
	// as it is.
	next := &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_SCHEDULED, Host: "h1", StatusVersion: rev}
	statusOp, _ = store.VMStatusOp("id-1", next)
	rev2, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{store.Unchanged(store.VMStatusKey("id-1"), rev)}, []clientv3.Op{statusOp})
	if err != nil || !ok {
		t.Fatalf("status update: %v %v", ok, err)
	}
	stored := &minicloudv1.VMStatus{}
	if _, err := store.Get(ctx, cli, store.VMStatusKey("id-1"), stored); err != nil || stored.StatusVersion != 0 || next.StatusVersion != rev {
		t.Fatalf("status stored with version %d (%v), argument left with %d; want 0 and %d", stored.StatusVersion, err, next.StatusVersion, rev)
	}
	vms, listRev, err := store.ListVMs(ctx, cli, 0)
	if err != nil || len(vms) != 1 {
		t.Fatalf("list: %v %v", vms, err)
	}
	if vms[0].Meta.ResourceVersion != rev || vms[0].Status.StatusVersion != rev2 || listRev != rev2 {
		t.Fatalf("after status write: rv %d sv %d list rev %d; want %d %d %d", vms[0].Meta.ResourceVersion, vms[0].Status.StatusVersion, listRev, rev, rev2, rev2)
	}
	// The old revision still reads the old status.
	old, _, err := store.ListVMs(ctx, cli, rev)
	if err != nil || old[0].Status.Phase != minicloudv1.VMPhase_VM_PHASE_PENDING {
		t.Fatalf("list at %d: %v %v", rev, old, err)
	}
	// A stale compare fails.
	if _, ok, _ := store.Commit(ctx, cli, []clientv3.Cmp{store.Unchanged(store.VMStatusKey("id-1"), rev)}, []clientv3.Op{statusOp}); ok {
		t.Fatal("commit with a stale status revision succeeded")
	}
	if _, err := store.GetVM(ctx, cli, "nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("get missing VM: %v", err)
	}
}

// TestComparesAsClientv3BuildsThem: Absent, Exists and Unchanged build
// their compares without clientv3.Compare (which clones first); they are
// the compares it builds, and hold or fail on a real etcd as they say.
func TestComparesAsClientv3BuildsThem(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want clientv3.Cmp
	}{
		{"Absent", store.Absent("k"), clientv3.Compare(clientv3.CreateRevision("k"), "=", 0)},
		{"Exists", store.Exists("k"), clientv3.Compare(clientv3.CreateRevision("k"), ">", 0)},
		{"Unchanged", store.Unchanged("k", 7), clientv3.Compare(clientv3.ModRevision("k"), "=", 7)},
		{"Unchanged 0", store.Unchanged("k", 0), clientv3.Compare(clientv3.CreateRevision("k"), "=", 0)},
	} {
		if !proto.Equal(c.got.GetCompare(), c.want.GetCompare()) {
			t.Errorf("%s: %v, want %v", c.name, c.got.GetCompare(), c.want.GetCompare())
		}
	}
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	holds := func(cmp clientv3.Cmp) bool {
		t.Helper()
		_, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{cmp}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !holds(store.Absent("k")) || holds(store.Exists("k")) || !holds(store.Unchanged("k", 0)) {
		t.Fatal("compares on an absent key")
	}
	resp, err := cli.Put(ctx, "k", "v")
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.Header.Revision
	if holds(store.Absent("k")) || !holds(store.Exists("k")) || !holds(store.Unchanged("k", rev)) || holds(store.Unchanged("k", rev-1)) {
		t.Fatal("compares on a present key")
	}
}

func TestUnchangedSinceSeesNewKeysUnderPrefix(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	resp, err := cli.Put(ctx, store.FlavorKey("small"), "x")
	if err != nil {
		t.Fatal(err)
	}
	scanRev := resp.Header.Revision
	if _, ok, _ := store.Commit(ctx, cli, []clientv3.Cmp{store.UnchangedSince(store.VMSpecPrefix, scanRev)}, nil); !ok {
		t.Fatal("empty prefix reported as changed")
	}
	if _, err := cli.Put(ctx, store.VMSpecKey("new"), "y"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := store.Commit(ctx, cli, []clientv3.Cmp{store.UnchangedSince(store.VMSpecPrefix, scanRev)}, nil); ok {
		t.Fatal("a key created after the scan was not noticed")
	}
}

func TestEventLogKeepsOrder(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	var txn store.Txn
	// The first list has room to spare: merging the second into it must
	// not write there (it is the caller's array).
	first := make([]*minicloudv1.Event, 2, 8)
	first[0], first[1] = &minicloudv1.Event{Reason: "A"}, &minicloudv1.Event{Reason: "B"}
	txn.AppendEvents("vm", time.Unix(1700000000, 0), first...)
	txn.AppendEvents("vm", time.Unix(1700000001, 0), &minicloudv1.Event{Reason: "C"})
	if _, ok, err := txn.Commit(ctx, cli); err != nil || !ok {
		t.Fatal(ok, err)
	}
	if first[:3][2] != nil {
		t.Fatal("merging the appends wrote into the caller's list")
	}
	evs, log, err := store.ReadEventLog(ctx, cli, "vm")
	if err != nil || len(evs) != 3 || evs[0].Reason != "A" || evs[1].Reason != "B" || evs[2].Reason != "C" || log.Appended != 3 {
		t.Fatalf("events %v %+v %v", evs, log, err)
	}
	if evs[2].Time.AsTime() != time.Unix(1700000001, 0).UTC() {
		t.Fatalf("stamp %v", evs[2].Time.AsTime())
	}
}

// appendEvents commits n events numbered from first to vm's log, retrying
// lost races as every caller does.
func appendEvents(t *testing.T, cli *clientv3.Client, vm string, first, n int) {
	t.Helper()
	for range 1000 {
		var txn store.Txn
		for i := range n {
			txn.AppendEvents(vm, time.Now(), &minicloudv1.Event{Message: fmt.Sprint(first + i)})
		}
		_, ok, err := txn.Commit(context.Background(), cli)
		if err != nil {
			t.Error(err)
			return
		}
		if ok {
			return
		}
	}
	t.Error("append lost 1000 races")
}

func TestEventLogIsCapped(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	total := 3 * store.MaxVMEvents
	for i := 0; i < total; i += 64 {
		appendEvents(t, cli, "vm", i, min(64, total-i))
	}
	evs, log, err := store.ReadEventLog(ctx, cli, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != store.MaxVMEvents || log.Appended != int64(total) || log.Dropped(len(evs)) != int64(total-store.MaxVMEvents) {
		t.Fatalf("%d events kept, %d appended, %d dropped; want %d, %d, %d", len(evs), log.Appended, log.Dropped(len(evs)),
			store.MaxVMEvents, total, total-store.MaxVMEvents)
	}
	for i, ev := range evs {
		if want := fmt.Sprint(total - store.MaxVMEvents + i); ev.Message != want {
			t.Fatalf("event %d is %q, want %q: the newest are kept, in order", i, ev.Message, want)
		}
	}
	if n := count(t, cli, store.VMEventsPrefix("vm")); n != int64(store.MaxVMEvents) {
		t.Fatalf("%d event keys in etcd", n)
	}
}

func TestEventLogCappedUnderConcurrentWriters(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	const writers, appends, per = 8, 40, 5
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a := range appends {
				appendEvents(t, cli, "vm", (w*appends+a)*per, per)
			}
		}()
	}
	wg.Wait()
	evs, log, err := store.ReadEventLog(ctx, cli, "vm")
	if err != nil {
		t.Fatal(err)
	}
	total := writers * appends * per
	if len(evs) != store.MaxVMEvents || log.Appended != int64(total) {
		t.Fatalf("%d events kept, %d counted; want %d of %d", len(evs), log.Appended, store.MaxVMEvents, total)
	}
	seen := map[string]bool{}
	for _, ev := range evs {
		if seen[ev.Message] {
			t.Fatalf("event %s stored twice", ev.Message)
		}
		seen[ev.Message] = true
	}
}

// countingKV counts the transactions (reads included) sent through it.
type countingKV struct {
	clientv3.KV
	mu  sync.Mutex
	txn int
}

func (c *countingKV) Txn(ctx context.Context) clientv3.Txn {
	c.mu.Lock()
	c.txn++
	c.mu.Unlock()
	return c.KV.Txn(ctx)
}

// TestAKnownEventLogIsNotReadAgain: an append whose writer read the log
// with the VM (GetVMAndEventLog, KnownEventLog) commits in one round trip;
// a stale one fails its compare and writes nothing.
func TestAKnownEventLogIsNotReadAgain(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	vm := &minicloudv1.VM{Meta: &minicloudv1.ObjectMeta{Id: "vm", Name: "web1", Project: "default"}, Spec: &minicloudv1.VMSpec{Image: "debian"}}
	specOp, err := store.VMSpecOp(vm)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := store.Commit(ctx, cli, nil, []clientv3.Op{specOp}); err != nil || !ok {
		t.Fatal(ok, err)
	}
	appendEvents(t, cli, "vm", 0, 2)
	got, log, err := store.GetVMAndEventLog(ctx, cli, "vm")
	if err != nil || got.GetSpec().GetImage() != "debian" || log.Appended != 2 || log.ModRevision == 0 {
		t.Fatalf("GetVMAndEventLog: %v, %+v, %v; want the VM and 2 appended", got, log, err)
	}
	kv := &countingKV{KV: cli}
	var txn store.Txn
	txn.AppendEvents("vm", time.Now(), &minicloudv1.Event{Message: "2"})
	txn.KnownEventLog("vm", log)
	if _, ok, err := txn.Commit(ctx, kv); err != nil || !ok || kv.txn != 1 {
		t.Fatalf("commit with the log known: ok %v, err %v, %d round trips; want ok in 1", ok, err, kv.txn)
	}
	var stale store.Txn
	stale.AppendEvents("vm", time.Now(), &minicloudv1.Event{Message: "again"})
	stale.KnownEventLog("vm", log)
	if _, ok, err := stale.Commit(ctx, cli); err != nil || ok {
		t.Fatalf("commit with a stale log: ok %v, err %v; want the compare to fail", ok, err)
	}
	evs, now, err := store.ReadEventLog(ctx, cli, "vm")
	if err != nil || len(evs) != 3 || evs[2].Message != "2" || now.Appended != 3 {
		t.Fatalf("events %v, log %+v, %v; want 0, 1, 2", evs, now, err)
	}
}
