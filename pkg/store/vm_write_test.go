package store_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// world is what a create refers to, stored in etcd.
type world struct {
	cli                   *clientv3.Client
	flavorRev, networkRev int64
}

func newWorld(t *testing.T) *world {
	t.Helper()
	_, cli := etcdtest.Start(t)
	w := &world{cli: cli}
	w.flavorRev = put(t, cli, store.FlavorKey("small"), &minicloudv1.Flavor{Meta: &minicloudv1.ObjectMeta{Name: "small"}, Vcpus: 1, MemoryMib: 512, DiskGib: 1})
	put(t, cli, store.ImageKey("tiny"), &minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Name: "tiny"}})
	w.networkRev = put(t, cli, store.NetworkKey("p", "default"), &minicloudv1.Network{Meta: &minicloudv1.ObjectMeta{Id: "net-1", Name: "default", Project: "p"}, Cidr: "10.0.0.0/24"})
	return w
}

func put(t *testing.T, kv clientv3.KV, key string, m proto.Message) int64 {
	t.Helper()
	v, err := store.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := kv.Put(context.Background(), key, v)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// newVM is a create of VM id named name with address ip.
func (w *world) newVM(id, name, ip string) store.NewVM {
	return store.NewVM{
		VM: &minicloudv1.VM{
			Meta: &minicloudv1.ObjectMeta{Id: id, Name: name, Project: "p"},
			Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "small", Resources: &minicloudv1.Resources{Vcpus: 1, MemoryMib: 512, DiskGib: 1}},
			Status: &minicloudv1.VMStatus{Phase: lifecycle.Pending, Addresses: []*minicloudv1.VMAddress{
				{Network: "default", Ip: ip},
			}},
		},
		UserData:  []byte("#cloud-config\n"),
		Event:     &minicloudv1.Event{Type: lifecycle.EventNormal, Reason: lifecycle.ReasonCreated},
		FlavorRev: w.flavorRev,
		Networks:  []store.NetworkRef{{ID: "net-1", Rev: w.networkRev}},
		Now:       time.Now(),
	}
}

// commits returns a function that commits what a protocol built and says
// whether it went through (so that commits(t, kv)(store.XTxn(...)) reads
// as one call).
func commits(t *testing.T, kv clientv3.KV) func(store.Txn, error) bool {
	return func(txn store.Txn, err error) bool {
		t.Helper()
		return commit(t, kv, txn, err)
	}
}

func commit(t *testing.T, kv clientv3.KV, txn store.Txn, err error) bool {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	_, ok, err := txn.Commit(context.Background(), kv)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func (w *world) create(t *testing.T, nv store.NewVM) bool {
	t.Helper()
	txn, err := store.CreateVMTxn(nv)
	return commit(t, w.cli, txn, err)
}

func (w *world) get(t *testing.T, id string) *minicloudv1.VM {
	t.Helper()
	vm, err := store.GetVM(context.Background(), w.cli, id)
	if err != nil {
		t.Fatal(err)
	}
	return vm
}

func count(t *testing.T, kv clientv3.KV, prefix string) int64 {
	t.Helper()
	resp, err := kv.Get(context.Background(), prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

func TestCreateVMTxn(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	nv := w.newVM("vm-1", "web1", "10.0.0.2")
	nv.RequestID = "req-1"
	lease, err := w.cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	nv.Lease = lease.ID
	if !w.create(t, nv) {
		t.Fatal("create did not commit")
	}
	vm := w.get(t, "vm-1")
	if vm.Status.Phase != lifecycle.Pending || vm.Spec.Image != "tiny" {
		t.Fatalf("created %v", vm)
	}
	for key, want := range map[string]string{
		store.IPAMKey("net-1", "10.0.0.2"): "vm-1",
		store.VMNameKey("p", "web1"):       "vm-1",
		store.VMRequestKey("p", "req-1"):   "vm-1",
		store.VMUserDataKey("vm-1"):        "#cloud-config\n",
	} {
		resp, err := w.cli.Get(ctx, key)
		if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != want {
			t.Errorf("%s: %v %v, want %q", key, resp, err, want)
		}
	}
	if n := count(t, w.cli, store.VMEventsPrefix("vm-1")); n != 1 {
		t.Fatalf("%d events, want 1", n)
	}

	// Each compare refuses its own race and writes nothing.
	rev := mustRev(t, w.cli)
	for name, nv := range map[string]store.NewVM{
		"name taken":    w.newVM("vm-2", "web1", "10.0.0.3"),
		"address taken": w.newVM("vm-2", "web2", "10.0.0.2"),
		"flavor changed": func() store.NewVM {
			nv := w.newVM("vm-2", "web2", "10.0.0.3")
			nv.FlavorRev--
			return nv
		}(),
		"network changed": func() store.NewVM {
			nv := w.newVM("vm-2", "web2", "10.0.0.3")
			nv.Networks[0].Rev++
			return nv
		}(),
		"image gone": func() store.NewVM {
			nv := w.newVM("vm-2", "web2", "10.0.0.3")
			nv.VM.Spec.Image = "gone"
			return nv
		}(),
		"server group gone": func() store.NewVM {
			nv := w.newVM("vm-2", "web2", "10.0.0.3")
			nv.VM.Spec.ServerGroup = "g"
			return nv
		}(),
		"request id used": func() store.NewVM {
			nv := w.newVM("vm-2", "web2", "10.0.0.3")
			nv.RequestID, nv.Lease = "req-1", lease.ID
			return nv
		}(),
	} {
		if w.create(t, nv) {
			t.Errorf("%s: create committed", name)
		}
	}
	if r := mustRev(t, w.cli); r != rev {
		t.Fatalf("refused creates wrote to etcd (revision %d -> %d)", rev, r)
	}
}

// place claims host for the VM as the scheduler does and returns the VM.
func (w *world) place(t *testing.T, id, host string) *minicloudv1.VM {
	t.Helper()
	vm := w.get(t, id)
	cs, err := store.ReadClaimState(context.Background(), w.cli, host, id)
	if err != nil {
		t.Fatal(err)
	}
	st := proto.CloneOf(vm.Status)
	st.Phase, st.Host = lifecycle.Scheduled, host
	txn, _, err := store.PlaceVMsTxn(store.HostPlacements{
		Alloc: cs.Alloc, AllocModRevision: cs.AllocModRevision,
		VMs: []store.Placement{{
			Claim:  &minicloudv1.Claim{VmId: id, Host: host, Resources: vm.Spec.Resources},
			Status: st, StatusRev: vm.Status.StatusVersion,
			Event: &minicloudv1.Event{Reason: lifecycle.ReasonScheduled}, Now: time.Now(),
		}},
	})
	if !commit(t, w.cli, txn, err) {
		t.Fatalf("place %s on %s did not commit", id, host)
	}
	return w.get(t, id)
}

func TestPlaceVMsTxnAndConflict(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	w.create(t, w.newVM("vm-1", "web1", "10.0.0.2"))
	w.create(t, w.newVM("vm-2", "web2", "10.0.0.3"))
	vm2 := w.get(t, "vm-2")
	w.place(t, "vm-1", "h1")
	if a := alloc(t, w.cli, "h1"); a.GetVmCount() != 1 {
		t.Fatalf("allocation after a placement: %v", a)
	}
	// vm-2 decided on a view from before vm-1's claim: the nested commit
	// fails alone and its Else reads the fresh host and status.
	st := proto.CloneOf(vm2.Status)
	st.Phase, st.Host = lifecycle.Scheduled, "h1"
	stale, _, err := store.PlaceVMsTxn(store.HostPlacements{VMs: []store.Placement{{
		Claim:  &minicloudv1.Claim{VmId: "vm-2", Host: "h1", Resources: vm2.Spec.Resources},
		Status: st, StatusRev: vm2.Status.StatusVersion, Event: &minicloudv1.Event{}, Now: time.Now(),
	}}})
	if err != nil {
		t.Fatal(err)
	}
	resps, _, err := store.CommitNested(ctx, w.cli, []store.Txn{stale})
	if err != nil || resps[0].Succeeded {
		t.Fatalf("placement on a stale allocation: %v %v", resps, err)
	}
	c, err := store.PlaceConflictOf(resps[0])
	if err != nil {
		t.Fatal(err)
	}
	if c.Alloc == nil || len(c.Claims) != 1 || len(c.Statuses) != 1 || c.Statuses[0].Status.GetPhase() != lifecycle.Pending || c.Statuses[0].Rev != vm2.Status.StatusVersion {
		t.Fatalf("conflict read %+v", c)
	}
	// The status compare: vm-1's status moved on since it was read.
	vm1 := w.get(t, "vm-1")
	txn, err := store.VMStatusTxn("vm-1", vm1.Status.StatusVersion-1, vm1.Status, time.Now())
	if commit(t, w.cli, txn, err) {
		t.Fatal("status write on a stale revision committed")
	}
	txn, err = store.VMStatusTxn("vm-1", vm1.Status.StatusVersion, vm1.Status, time.Now(), &minicloudv1.Event{Reason: lifecycle.ReasonHostDown})
	if !commit(t, w.cli, txn, err) {
		t.Fatal("status write on the current revision did not commit")
	}
	if n := count(t, w.cli, store.VMEventsPrefix("vm-1")); n != 3 {
		t.Fatalf("%d events, want 3", n)
	}
}

func TestRemoveVMTxnReleasesEverything(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	w.create(t, w.newVM("vm-1", "web1", "10.0.0.2"))
	w.create(t, w.newVM("vm-2", "web2", "10.0.0.3"))
	w.place(t, "vm-2", "h1")
	vm := w.place(t, "vm-1", "h1")
	// A damaged range: vm-1 also lists an address another VM holds, and
	// one on a network that is gone. Neither may block the removal.
	vm.Status.Addresses = append(vm.Status.Addresses, &minicloudv1.VMAddress{Network: "default", Ip: "10.0.0.3"}, &minicloudv1.VMAddress{Network: "gone", Ip: "10.9.0.2"})

	txn, err := store.RemoveVMTxn(ctx, w.cli, vm)
	if err != nil {
		t.Fatal(err)
	}
	// Stale: the status changes between read and commit.
	put(t, w.cli, store.VMStatusKey("vm-1"), vm.Status)
	if _, ok, _ := txn.Commit(ctx, w.cli); ok {
		t.Fatal("removal built on a stale read committed")
	}
	vm = w.get(t, "vm-1")
	if !commits(t, w.cli)(store.RemoveVMTxn(ctx, w.cli, vm)) {
		t.Fatal("removal did not commit")
	}
	for _, p := range []string{store.VMSpecKey("vm-1"), store.VMStatusKey("vm-1"), store.VMUserDataKey("vm-1"), store.VMNameKey("p", "web1"),
		store.VMEventsPrefix("vm-1"), store.VMEventSeqKey("vm-1"), store.IPAMKey("net-1", "10.0.0.2"), store.ClaimKey("h1", "vm-1")} {
		if n := count(t, w.cli, p); n != 0 {
			t.Errorf("%s: %d keys left", p, n)
		}
	}
	if n := count(t, w.cli, store.IPAMKey("net-1", "10.0.0.3")); n != 1 {
		t.Error("the other VM's address was released")
	}
	if a := alloc(t, w.cli, "h1"); a.GetVmCount() != 1 || a.GetAllocated().GetVcpus() != 1 {
		t.Fatalf("allocation after removal: %v", a)
	}
}

func TestRescheduleVMTxn(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	w.create(t, w.newVM("vm-1", "web1", "10.0.0.2"))
	vm := w.place(t, "vm-1", "h1")
	next := proto.CloneOf(vm.Status)
	next.Phase, next.Host, next.TriedHosts = lifecycle.Pending, "", []string{"h1"}
	if !commits(t, w.cli)(store.RescheduleVMTxn(ctx, w.cli, vm, next, time.Now(), &minicloudv1.Event{Reason: lifecycle.ReasonRescheduling})) {
		t.Fatal("reschedule did not commit")
	}
	got := w.get(t, "vm-1")
	if got.Status.Phase != lifecycle.Pending || got.Status.Host != "" || len(got.Status.Addresses) != 1 {
		t.Fatalf("after reschedule %v", got.Status)
	}
	if n := count(t, w.cli, store.ClaimKey("h1", "vm-1")); n != 0 {
		t.Fatal("claim kept")
	}
	if a := alloc(t, w.cli, "h1"); a.GetVmCount() != 0 {
		t.Fatalf("allocation after reschedule: %v", a)
	}
	// The same transaction again is built on a stale read.
	if commits(t, w.cli)(store.RescheduleVMTxn(ctx, w.cli, vm, next, time.Now())) {
		t.Fatal("a second reschedule from the same read committed")
	}
}

func TestSpecAndStatusUpdatesCompare(t *testing.T) {
	w := newWorld(t)
	w.create(t, w.newVM("vm-1", "web1", "10.0.0.2"))
	vm := w.get(t, "vm-1")
	now := time.Now()

	vm.Spec.PowerState = minicloudv1.PowerState_POWER_STATE_STOPPED
	if !commits(t, w.cli)(store.UpdateVMSpecTxn(vm, now, &minicloudv1.Event{Reason: lifecycle.ReasonStopRequested})) {
		t.Fatal("spec update did not commit")
	}
	if commits(t, w.cli)(store.UpdateVMSpecTxn(vm, now)) {
		t.Fatal("spec update from a stale read committed")
	}
	vm = w.get(t, "vm-1")
	if vm.Spec.PowerState != minicloudv1.PowerState_POWER_STATE_STOPPED {
		t.Fatalf("spec %v", vm.Spec)
	}

	next := proto.CloneOf(vm.Status)
	next.Message = "observed"
	if !commits(t, w.cli)(store.UpdateVMStatusTxn(vm, next, now)) {
		t.Fatal("status update did not commit")
	}
	if commits(t, w.cli)(store.UpdateVMStatusTxn(vm, next, now)) {
		t.Fatal("status update from a stale read committed")
	}

	vm = w.get(t, "vm-1")
	del := proto.CloneOf(vm)
	del.Spec.DeletionRequested, del.Status.Phase = true, lifecycle.Deleting
	if !commits(t, w.cli)(store.MarkVMDeletingTxn(vm, del, now.Add(time.Millisecond), &minicloudv1.Event{Reason: lifecycle.ReasonDeleteRequested})) {
		t.Fatal("mark deleting did not commit")
	}
	if commits(t, w.cli)(store.MarkVMDeletingTxn(vm, del, now)) {
		t.Fatal("mark deleting from a stale read committed")
	}
	if got := w.get(t, "vm-1"); !got.Spec.DeletionRequested || got.Status.Phase != lifecycle.Deleting || got.Status.Message != "observed" {
		t.Fatalf("after mark deleting %v", got)
	}
	if n := count(t, w.cli, store.VMEventsPrefix("vm-1")); n != 3 {
		t.Fatalf("%d events, want 3", n)
	}
}

func TestReadsAreNamed(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	put(t, cli, store.FlavorKey("a"), &minicloudv1.Flavor{Vcpus: 1})
	put(t, cli, store.FlavorKey("b"), &minicloudv1.Flavor{Vcpus: 2})
	var r store.Reads
	missing := r.Get(store.FlavorKey("c"))
	all := r.Get(store.FlavorPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	b := r.Get(store.FlavorKey("b"))
	if err := r.Do(ctx, cli); err != nil {
		t.Fatal(err)
	}
	f := &minicloudv1.Flavor{}
	if missing.First() != nil || all.Count() != 2 || b.First() == nil || store.Decode(b.First(), f) != nil || f.Vcpus != 2 || r.Revision() == 0 {
		t.Fatalf("reads: missing %v, count %d, b %v", missing.KVs(), all.Count(), f)
	}
}

// TestCheckCreateVMs: a group commit of three creates fails because the
// second's address and the third's name were taken after they were
// decided; CheckCreateVMs names exactly those two, reads the usage as it
// is, and a commit of the first alone then goes through.
func TestCheckCreateVMs(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	put(t, w.cli, store.QuotaUsageKey("p"), &minicloudv1.QuotaUsage{Networks: 1})
	usage, err := store.ReadCountedUsage(ctx, w.cli, "p")
	if err != nil {
		t.Fatal(err)
	}
	vms := []store.NewVM{w.newVM("a", "a", "10.0.0.2"), w.newVM("b", "b", "10.0.0.3"), w.newVM("c", "c", "10.0.0.4")}
	if _, err := w.cli.Put(ctx, store.IPAMKey("net-1", "10.0.0.3"), "other"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.cli.Put(ctx, store.VMNameKey("p", "c"), "other"); err != nil {
		t.Fatal(err)
	}
	if commits(t, w.cli)(store.CreateVMsTxn(usage, &minicloudv1.QuotaUsage{Instances: 3}, vms...)) {
		t.Fatal("batch committed over a taken address and name")
	}
	check, err := store.CheckCreateVMs(ctx, w.cli, "p", vms...)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(check.Failed) != "[1 2]" || check.Usage.UsageRev != usage.UsageRev || !check.Usage.Counted() {
		t.Fatalf("check: failed %v, usage %+v (was %+v)", check.Failed, check.Usage, usage)
	}
	if !commits(t, w.cli)(store.CreateVMsTxn(check.Usage, &minicloudv1.QuotaUsage{Networks: 1, Instances: 1}, vms[0])) {
		t.Fatal("the create whose compares held did not commit alone")
	}
	if got := count(t, w.cli, store.VMSpecPrefix); got != 1 {
		t.Fatalf("%d VMs stored, want 1", got)
	}
	// Now the usage moved (the commit above): the check says so, and that
	// the first's own compares fail too (its name is taken, by itself).
	check, err = store.CheckCreateVMs(ctx, w.cli, "p", vms...)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(check.Failed) != "[0 1 2]" || check.Usage.UsageRev == usage.UsageRev || check.Usage.Usage.GetInstances() != 1 {
		t.Fatalf("second check: failed %v, usage %+v", check.Failed, check.Usage)
	}
}

// BenchmarkCreateVMsTxn builds the transaction of a group commit of 32
// creates (createbatch.go), as the API server does for every batch: its
// allocations are per batch; divide by 32 for one create's.
func BenchmarkCreateVMsTxn(b *testing.B) {
	usage := store.UsageState{Project: "p", Usage: &minicloudv1.QuotaUsage{}, Overrides: &minicloudv1.QuotaLimits{}}
	vms := make([]store.NewVM, 32)
	for i := range vms {
		id := fmt.Sprintf("vm-%02d", i)
		vms[i] = store.NewVM{
			VM: &minicloudv1.VM{
				Meta: &minicloudv1.ObjectMeta{Id: id, Name: id, Project: "p"},
				Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "small", Networks: []string{"default"}},
				Status: &minicloudv1.VMStatus{Phase: lifecycle.Pending, Addresses: []*minicloudv1.VMAddress{
					{Network: "default", Ip: fmt.Sprintf("10.0.0.%d", i+2), PrefixLength: 24, Gateway: "10.0.0.1"},
				}},
			},
			UserData: []byte("#cloud-config\n"), FlavorRev: 2, ImageRev: 3,
			Networks:  []store.NetworkRef{{ID: "net-1", Rev: 4}},
			RequestID: "req-" + id, RequestFingerprint: "f",
			Event: &minicloudv1.Event{Reason: lifecycle.ReasonCreated, Message: "created"},
			Now:   time.Now(),
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := store.CreateVMsTxn(usage, &minicloudv1.QuotaUsage{Instances: 32}, vms...); err != nil {
			b.Fatal(err)
		}
	}
}
