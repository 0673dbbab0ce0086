package server_test

import (
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// endLease ends a host's heartbeat lease, as 15 s without a heartbeat do.
func (e *env) endLease(host string) {
	e.t.Helper()
	resp, err := e.etcd.Get(ctx(e.t), store.HostAliveKey(host))
	if err != nil || len(resp.Kvs) == 0 {
		e.t.Fatalf("host %s has no lease: %v", host, err)
	}
	if _, err := e.etcd.Revoke(ctx(e.t), clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) hostState(name string) *minicloudv1.Host {
	e.t.Helper()
	h, err := e.hosts.GetHost(ctx(e.t), &minicloudv1.GetHostRequest{Name: name})
	if err != nil {
		e.t.Fatal(err)
	}
	return h
}

// TestHostFailureNeedsFencing walks a host through UP, UNREACHABLE and
// FENCED: evacuation and forced deletes are refused until it is fenced,
// then move VMs off it with their addresses, release its capacity, and
// leave it release records it is sent when it comes back.
func TestHostFailureNeedsFencing(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	e.registerHost("h1", "127.0.0.1:8642")
	e.registerHost("h2", "127.0.0.1:8643")
	if _, err := e.hosts.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	web1, web2, web3 := e.createVM("web1"), e.createVM("web2"), e.createVM("web3")
	for _, vm := range []*minicloudv1.VM{web1, web2, web3} {
		e.place(vm.Meta.Id, "h1")
	}
	if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web3"}); err != nil {
		t.Fatal(err)
	}

	// UP: nothing leaves the host without it.
	_, err := e.hosts.FenceHost(c, &minicloudv1.FenceHostRequest{Name: "h1"})
	wantCode(t, err, codes.InvalidArgument, "--confirm")
	_, err = e.hosts.FenceHost(c, &minicloudv1.FenceHostRequest{Name: "h1", Confirm: true})
	wantCode(t, err, codes.FailedPrecondition, "is UP")
	_, err = e.hosts.FenceHost(c, &minicloudv1.FenceHostRequest{Name: "nope", Confirm: true})
	wantCode(t, err, codes.NotFound, "not registered")
	before := e.dump(t)
	_, err = e.hosts.EvacuateHost(c, &minicloudv1.EvacuateHostRequest{Name: "h1"})
	wantCode(t, err, codes.FailedPrecondition, "is UP")
	_, err = e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web2", Force: true})
	wantCode(t, err, codes.FailedPrecondition, "is UP")
	_, err = e.hosts.DeleteHost(c, &minicloudv1.DeleteHostRequest{Name: "h1"})
	wantCode(t, err, codes.FailedPrecondition, "is UP")
	e.wantUnchanged(t, before)

	// UNREACHABLE: its VMs may still run.
	e.endLease("h1")
	if h := e.hostState("h1"); h.State != minicloudv1.HostState_HOST_STATE_UNREACHABLE {
		t.Fatalf("state %v after the lease ended", h.State)
	}
	before = e.dump(t)
	_, err = e.hosts.EvacuateHost(c, &minicloudv1.EvacuateHostRequest{Name: "h1"})
	wantCode(t, err, codes.FailedPrecondition, "not FENCED")
	_, err = e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web2", Force: true})
	wantCode(t, err, codes.FailedPrecondition, "host fence h1 --confirm")
	e.wantUnchanged(t, before)

	// FENCED by the operator's word.
	h, err := e.hosts.FenceHost(c, &minicloudv1.FenceHostRequest{Name: "h1", Confirm: true, Reason: "powered off"})
	if err != nil || h.State != minicloudv1.HostState_HOST_STATE_FENCED || h.Fence.GetReason() != "powered off" || !strings.HasPrefix(h.Fence.GetBy(), "operator:") {
		t.Fatalf("fence: %v %v", h, err)
	}
	_, err = e.hosts.EvacuateHost(c, &minicloudv1.EvacuateHostRequest{Name: "h1", VmIds: []string{"nope"}})
	wantCode(t, err, codes.NotFound, "no VM nope on host h1")

	resp, err := e.hosts.EvacuateHost(c, &minicloudv1.EvacuateHostRequest{Name: "h1", VmIds: []string{"web1"}})
	if err != nil || len(resp.Vms) != 1 {
		t.Fatalf("evacuate web1: %v %v", resp, err)
	}
	got := resp.Vms[0]
	if got.Meta.Id != web1.Meta.Id || got.Status.Phase != lifecycle.Pending || got.Status.Host != "" || got.Status.Reason != lifecycle.ReasonEvacuated ||
		len(got.Status.TriedHosts) != 1 || got.Status.TriedHosts[0] != "h1" || got.Status.AssignmentEpoch != 1 ||
		got.Status.Addresses[0].Ip != web1.Status.Addresses[0].Ip {
		t.Fatalf("evacuated web1: %v", got.Status)
	}
	evs, err := e.vms.ListVMEvents(c, &minicloudv1.ListVMEventsRequest{Name: "web1"})
	if err != nil || !strings.Contains(evs.Events[len(evs.Events)-1].Message, "local disk on h1 is lost") {
		t.Fatalf("events of web1: %v %v", evs, err)
	}

	if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web2", Force: true}); err != nil {
		t.Fatalf("force delete on a fenced host: %v", err)
	}
	if _, err := e.vms.GetVM(c, &minicloudv1.GetVMRequest{Name: "web2"}); statusCode(err) != codes.NotFound {
		t.Fatalf("web2 after a forced delete: %v", err)
	}
	// The rest: web3 was being deleted, so it goes for good.
	resp, err = e.hosts.EvacuateHost(c, &minicloudv1.EvacuateHostRequest{Name: "h1"})
	if err != nil || len(resp.Vms) != 0 {
		t.Fatalf("evacuate the rest: %v %v", resp, err)
	}
	if _, err := e.vms.GetVM(c, &minicloudv1.GetVMRequest{Name: "web3"}); statusCode(err) != codes.NotFound {
		t.Fatalf("web3 (DELETING) after evacuation: %v", err)
	}
	if h := e.hostState("h1"); h.VmCount != 0 || h.Allocated.GetVcpus() != 0 {
		t.Fatalf("h1 still holds capacity: %v", h)
	}
	e.checkConsistent()

	// The host comes back: it is UP, no longer fenced, and before its
	// BOOKMARK it is told which VMs it must destroy.
	if _, err := e.hosts.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	if h := e.hostState("h1"); h.State != minicloudv1.HostState_HOST_STATE_UP || h.Fence != nil {
		t.Fatalf("h1 after its heartbeat: %v", h)
	}
	stream, err := e.hosts.WatchAssignments(c, &minicloudv1.WatchAssignmentsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	released := map[string]bool{}
	for {
		ev, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Type == minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK {
			break
		}
		if ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED || !ev.Released {
			t.Fatalf("before the bookmark: %v", ev)
		}
		released[ev.Vm.Meta.Id] = true
	}
	if len(released) != 3 || !released[web1.Meta.Id] || !released[web2.Meta.Id] || !released[web3.Meta.Id] {
		t.Fatalf("released %v, want web1, web2, web3", released)
	}
	for id := range released {
		if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: id, ReleasedConfirmed: true}); err != nil {
			t.Fatal(err)
		}
	}
	if ids, err := store.ListReleased(c, e.etcd, "h1", 0); err != nil || len(ids) != 0 {
		t.Fatalf("release records after confirmation: %v %v", ids, err)
	}

	// web1 is placed again (epoch 2): a report of the old copy is refused.
	e.place(web1.Meta.Id, "h2")
	_, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: web1.Meta.Id, AssignmentEpoch: 1,
		Status: &minicloudv1.VMStatus{Phase: lifecycle.Creating}})
	wantCode(t, err, codes.FailedPrecondition, "epoch 1, the current one is 2")
	if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: web1.Meta.Id, AssignmentEpoch: 2,
		Status: &minicloudv1.VMStatus{Phase: lifecycle.Creating}}); err != nil {
		t.Fatal(err)
	}

	// A host is removed only when it is not UP and holds nothing.
	_, err = e.hosts.DeleteHost(c, &minicloudv1.DeleteHostRequest{Name: "h2"})
	wantCode(t, err, codes.FailedPrecondition, "still holds 1 VMs")
	e.endLease("h1")
	if _, err := e.hosts.DeleteHost(c, &minicloudv1.DeleteHostRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hosts.GetHost(c, &minicloudv1.GetHostRequest{Name: "h1"}); statusCode(err) != codes.NotFound {
		t.Fatalf("h1 after delete: %v", err)
	}
	d := e.dump(t)
	for k := range d {
		if strings.Contains(k, "/h1") && !strings.HasPrefix(k, store.RevokedPrefix) && !strings.HasPrefix(k, store.HostCertPrefix) {
			t.Errorf("key %s of the deleted host remains", k)
		}
	}
}

// TestFenceAfterBounded: a self-fencing delay must be shorter than the
// lease, or the control plane would count a host fenced that is not.
func TestFenceAfterBounded(t *testing.T) {
	e := newEnv(t)
	_, err := e.hosts.RegisterHost(ctx(t), &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: "h1"}, Address: "127.0.0.1:8642", FenceAfterSeconds: 15,
		Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 16384, DiskGib: 100}, Hypervisors: []string{"tcg"},
	}})
	wantCode(t, err, codes.InvalidArgument, "shorter than the 15s lease")
}

// TestForceDeleteIsForAdmins: a project member deletes its VMs, but only
// an admin says a VM's host is gone for good (force).
func TestForceDeleteIsForAdmins(t *testing.T) {
	e := newEnv(t)
	e.seed()
	resp, err := minicloudv1.NewAuthServiceClient(e.conn).CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: "mia", Project: "default", Role: "member"})
	if err != nil {
		t.Fatal(err)
	}
	mia := minicloudv1.NewVMServiceClient(e.userConn(resp.Token))
	if _, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web1", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}}); err != nil {
		t.Fatal(err)
	}
	before := e.dump(t)
	_, err = mia.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web1", Force: true})
	wantCode(t, err, codes.PermissionDenied, "with force needs the admin role")
	e.wantUnchanged(t, before)
	if _, err := mia.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web1"}); err != nil {
		t.Fatalf("a member's delete: %v", err)
	}
}
