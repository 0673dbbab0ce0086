package store_test

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

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
	// A status write moves only the status version.
	statusOp, _ = store.VMStatusOp("id-1", &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_SCHEDULED, Host: "h1"})
	rev2, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{store.Unchanged(store.VMStatusKey("id-1"), rev)}, []clientv3.Op{statusOp})
	if err != nil || !ok {
		t.Fatalf("status update: %v %v", ok, err)
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

func TestEventOpsKeepOrder(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	now := time.Unix(1700000000, 0)
	ops, err := store.EventOps("vm", now, &minicloudv1.Event{Reason: "A"}, &minicloudv1.Event{Reason: "B"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := store.Commit(ctx, cli, nil, ops); err != nil {
		t.Fatal(err)
	}
	evs, _, err := store.List(ctx, cli, store.VMEventsPrefix("vm"), func() *minicloudv1.Event { return &minicloudv1.Event{} })
	if err != nil || len(evs) != 2 || evs[0].Value.Reason != "A" || evs[1].Value.Reason != "B" {
		t.Fatalf("events %v %v", evs, err)
	}
}
