package server_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

func TestHostLifecycle(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	_, err := e.hosts.RegisterHost(c, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "h1"}, Address: "nope"}})
	wantCode(t, err, codes.InvalidArgument, "must be host:port")
	_, err = e.hosts.RegisterHost(c, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "h1"}, Address: "127.0.0.1:8642",
		Capacity: &minicloudv1.Resources{Vcpus: 2, MemoryMib: 1024}, Hypervisors: []string{"xen"}}})
	wantCode(t, err, codes.InvalidArgument, `hypervisor "xen" is not supported`)
	_, err = e.hosts.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"})
	wantCode(t, err, codes.NotFound, "must call RegisterHost")

	resp, err := e.hosts.RegisterHost(c, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "h1"}, Address: "127.0.0.1:8642",
		Capacity: &minicloudv1.Resources{Vcpus: 2, MemoryMib: 1024, DiskGib: 10}, Hypervisors: []string{"tcg"}}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.HeartbeatIntervalSeconds != 5 || resp.LeaseTtlSeconds != 15 || resp.Host.State != minicloudv1.HostState_HOST_STATE_UNREACHABLE ||
		resp.Host.AllocationRatios.GetCpu() != 4 || resp.Host.Meta.GetId() == "" {
		t.Fatalf("register: %v", resp)
	}
	if _, err := e.hosts.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	h, err := e.hosts.GetHost(c, &minicloudv1.GetHostRequest{Name: "h1"})
	if err != nil || h.State != minicloudv1.HostState_HOST_STATE_UP || h.LastHeartbeat == nil {
		t.Fatalf("after heartbeat: %v %v", h, err)
	}
	alive, _ := e.etcd.Get(c, store.HostAliveKey("h1"))
	lease := alive.Kvs[0].Lease
	if _, err := e.hosts.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	if again, _ := e.etcd.Get(c, store.HostAliveKey("h1")); again.Kvs[0].Lease != lease || string(again.Kvs[0].Value) != strconv.FormatInt(lease, 10) {
		t.Fatal("a heartbeat on a live lease changed the alive key")
	}
	// The lease ending (what expiry does after 15 s) makes the host DOWN;
	// the next heartbeat brings it back on a new lease.
	if _, err := e.etcd.Revoke(c, clientv3.LeaseID(lease)); err != nil {
		t.Fatal(err)
	}
	if h, _ := e.hosts.GetHost(c, &minicloudv1.GetHostRequest{Name: "h1"}); h.State != minicloudv1.HostState_HOST_STATE_UNREACHABLE {
		t.Fatalf("state %v after the lease ended", h.State)
	}
	if _, err := e.hosts.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	if h, _ := e.hosts.GetHost(c, &minicloudv1.GetHostRequest{Name: "h1"}); h.State != minicloudv1.HostState_HOST_STATE_UP {
		t.Fatalf("state %v after a heartbeat on an expired lease", h.State)
	}

	// The admin's disabled flag survives re-registration.
	if h, err := e.hosts.DisableHost(c, &minicloudv1.DisableHostRequest{Name: "h1", Reason: "maintenance"}); err != nil || !h.Disabled {
		t.Fatalf("disable: %v %v", h, err)
	}
	e.registerHost("h1", "127.0.0.1:9999")
	list, err := e.hosts.ListHosts(c, &minicloudv1.ListHostsRequest{})
	if err != nil || len(list.Hosts) != 1 || !list.Hosts[0].Disabled || list.Hosts[0].DisabledReason != "maintenance" || list.Hosts[0].Address != "127.0.0.1:9999" {
		t.Fatalf("list after re-register: %v %v", list, err)
	}
	if h, err := e.hosts.EnableHost(c, &minicloudv1.EnableHostRequest{Name: "h1"}); err != nil || h.Disabled {
		t.Fatalf("enable: %v %v", h, err)
	}
	_, err = e.hosts.DisableHost(c, &minicloudv1.DisableHostRequest{Name: "h9"})
	wantCode(t, err, codes.NotFound, "host h9 is not registered")

	// Allocation shows up once the scheduler claims.
	e.seed()
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")
	if h, _ := e.hosts.GetHost(c, &minicloudv1.GetHostRequest{Name: "h1"}); h.VmCount != 1 || h.Allocated.GetMemoryMib() != 1024 {
		t.Fatalf("allocation %v %d", h.Allocated, h.VmCount)
	}
	e.createProjects("p2")
	if _, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "default", Project: "p2", Cidr: "10.98.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	e.createVM("elsewhere", func(r *minicloudv1.CreateVMRequest) { r.Project = "p2" })
	for _, q := range []struct {
		req  *minicloudv1.ListVMsRequest
		want int
	}{
		{&minicloudv1.ListVMsRequest{AllProjects: true}, 2},
		{&minicloudv1.ListVMsRequest{AllProjects: true, Host: "h1"}, 1},
		{&minicloudv1.ListVMsRequest{Project: "p2", Host: "h1"}, 0},
	} {
		if list, err := e.vms.ListVMs(c, q.req); err != nil || len(list.Vms) != q.want {
			t.Fatalf("list %v: %v %v, want %d VMs", q.req, list, err, q.want)
		}
	}
}

func TestReportVMStatus(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	e.registerHost("h2", "127.0.0.1:1")
	vm := e.createVM("web1")
	c := ctx(t)

	_, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING}})
	wantCode(t, err, codes.FailedPrecondition, "not assigned to any host")
	e.place(vm.Meta.Id, "h1")
	_, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING}})
	wantCode(t, err, codes.FailedPrecondition, "assigned to host h1, not to h2")
	_, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: "no-such-id"})
	wantCode(t, err, codes.NotFound, "does not exist")

	// A host reports only what it observes: never PENDING, and never
	// DELETING (the API's). (RUNNING straight from SCHEDULED is a create
	// that reported CREATING with it: pkg/lifecycle.)
	for _, p := range []lifecycle.Phase{lifecycle.Pending, lifecycle.Deleting} {
		_, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: p}})
		wantCode(t, err, codes.FailedPrecondition, "from SCHEDULED to "+lifecycle.PhaseName(p))
	}
	if _, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: lifecycle.Creating}}); err != nil {
		t.Fatal(err)
	}

	// The host's report replaces what it observes and keeps the rest.
	_, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id,
		Status: &minicloudv1.VMStatus{
			Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING, Hypervisor: "tcg", ObservedRebootGeneration: 3, ObservedResourceVersion: 7,
			Host: "forged", Addresses: []*minicloudv1.VMAddress{{Ip: "6.6.6.6"}},
			Conditions: []*minicloudv1.Condition{{Type: "DomainRunning", Status: true, Reason: "Started"}},
		},
		// A reporter's own time is not believed: the server stamps events.
		Events: []*minicloudv1.Event{{Type: "Normal", Reason: "Started", Message: "domain started", Time: timestamppb.New(time.Unix(0, 0))}}})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := e.vms.GetVM(c, &minicloudv1.GetVMRequest{Name: "web1"})
	st := got.Status
	if st.Phase != minicloudv1.VMPhase_VM_PHASE_RUNNING || st.Hypervisor != "tcg" || st.ObservedRebootGeneration != 3 || st.ObservedResourceVersion != 7 ||
		st.Host != "h1" || st.Addresses[0].Ip != vm.Status.Addresses[0].Ip || len(st.Conditions) != 1 {
		t.Fatalf("status after report: %v", st)
	}
	evs, _ := e.vms.ListVMEvents(c, &minicloudv1.ListVMEventsRequest{Name: "web1"})
	if last := evs.Events[len(evs.Events)-1]; last.Reason != "Started" || last.Source != "agent/h1" || time.Since(last.Time.AsTime()) > time.Minute {
		t.Fatalf("event %v", last)
	}
	// Reporting the same again writes nothing (no watcher wakes up).
	before := e.rev()
	if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Status: st}); err != nil {
		t.Fatal(err)
	}
	if after := e.rev(); after != before {
		t.Fatalf("an unchanged report wrote %d revisions", after-before)
	}

	// Reschedule: back to PENDING, host remembered as tried, claim released.
	_, err = e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Reschedule: true,
		Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_ERROR, Message: "disk full"}})
	if err != nil {
		t.Fatal(err)
	}
	got, _ = e.vms.GetVM(c, &minicloudv1.GetVMRequest{Name: "web1"})
	if got.Status.Phase != minicloudv1.VMPhase_VM_PHASE_PENDING || got.Status.Host != "" || len(got.Status.TriedHosts) != 1 || got.Status.TriedHosts[0] != "h1" ||
		len(got.Status.Addresses) != 1 {
		t.Fatalf("after reschedule: %v", got.Status)
	}
	st1, _ := store.ReadClaimState(c, e.etcd, "h1", vm.Meta.Id)
	if st1.Claim != nil || st1.Alloc.GetVmCount() != 0 {
		t.Fatalf("claim after reschedule: %v %v", st1.Claim, st1.Alloc)
	}

	// A VM being deleted that its host gives back has nowhere to go: it is
	// removed instead of rescheduled.
	e.place(vm.Meta.Id, "h2")
	if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: vm.Meta.Id, Reschedule: true}); err != nil {
		t.Fatal(err)
	}
	_, err = e.vms.GetVM(c, &minicloudv1.GetVMRequest{Name: "web1"})
	wantCode(t, err, codes.NotFound, "not found")
	e.checkConsistent()
}

func TestWatchAssignments(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	e.registerHost("h2", "127.0.0.1:1")
	a := e.createVM("a", func(r *minicloudv1.CreateVMRequest) { r.UserData = []byte("#cloud-config a") })
	b := e.createVM("b")
	e.place(a.Meta.Id, "h1")
	e.place(b.Meta.Id, "h2")

	wctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	_, err := mustRecvErr(e.hosts.WatchAssignments(wctx, &minicloudv1.WatchAssignmentsRequest{Host: "h9"}))
	wantCode(t, err, codes.NotFound, "host h9 is not registered")
	stream, err := e.hosts.WatchAssignments(wctx, &minicloudv1.WatchAssignmentsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	next := func() *minicloudv1.AssignmentEvent {
		t.Helper()
		ev, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED || ev.Vm.Meta.Name != "a" || string(ev.UserData) != "#cloud-config a" {
		t.Fatalf("first event %v", ev)
	}
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK || ev.Vm != nil || ev.ResourceVersion == 0 {
		t.Fatalf("want BOOKMARK, got %v", ev)
	}
	c := e.createVM("c", func(r *minicloudv1.CreateVMRequest) { r.UserData = []byte("c") })
	e.place(c.Meta.Id, "h1")
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED || ev.Vm.Meta.Name != "c" || string(ev.UserData) != "c" {
		t.Fatalf("new assignment %v", ev)
	}
	if _, err := e.vms.StopVM(ctx(t), &minicloudv1.VMActionRequest{Name: "a"}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED || ev.Vm.Spec.PowerState != minicloudv1.PowerState_POWER_STATE_STOPPED {
		t.Fatalf("spec change %v", ev)
	}
	if _, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: c.Meta.Id, Reschedule: true}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED || ev.Vm.Meta.Name != "c" {
		t.Fatalf("rescheduled VM: %v", ev)
	}
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "a"}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED || !ev.Vm.Spec.DeletionRequested {
		t.Fatalf("deletion request: %v", ev)
	}
	if _, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: a.Meta.Id, Deleted: true}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED || ev.Vm.Meta.Name != "a" {
		t.Fatalf("removed VM: %v", ev)
	}
}

func mustRecvErr(s minicloudv1.HostService_WatchAssignmentsClient, err error) (*minicloudv1.AssignmentEvent, error) {
	if err != nil {
		return nil, err
	}
	return s.Recv()
}

// agentDouble is a minimal AgentService on loopback standing in for the
// agent (whose real implementation is tested with libvirt in agent/).
type agentDouble struct {
	minicloudv1.UnimplementedAgentServiceServer
	got *minicloudv1.AgentConsoleLogRequest
}

func (a *agentDouble) GetConsoleLog(_ context.Context, req *minicloudv1.AgentConsoleLogRequest) (*minicloudv1.GetConsoleLogResponse, error) {
	a.got = req
	if req.VmId == "" {
		return nil, errdefs.ToGRPC(errdefs.Invalid("no vm"))
	}
	return &minicloudv1.GetConsoleLogResponse{Data: []byte("login: "), Truncated: true}, nil
}

func TestGetConsoleLog(t *testing.T) {
	e := newEnv(t)
	e.seed()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	agent := &agentDouble{}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(e.hostServerTLS("h1"))))
	minicloudv1.RegisterAgentServiceServer(gs, agent)
	go gs.Serve(lis)
	defer gs.Stop()
	e.registerHost("h1", lis.Addr().String())
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	e.registerHost("h2", deadAddr)

	vm := e.createVM("web1")
	_, err = e.vms.GetConsoleLog(ctx(t), &minicloudv1.GetConsoleLogRequest{Name: "web1"})
	wantCode(t, err, codes.FailedPrecondition, "not on a host yet")
	e.place(vm.Meta.Id, "h1")
	resp, err := e.vms.GetConsoleLog(ctx(t), &minicloudv1.GetConsoleLogRequest{Name: "web1"})
	if err != nil || string(resp.Data) != "login: " || !resp.Truncated || agent.got.VmId != vm.Meta.Id || agent.got.TailBytes != 64<<10 {
		t.Fatalf("console: %v %v %v", resp, err, agent.got)
	}
	other := e.createVM("web2")
	e.place(other.Meta.Id, "h2")
	_, err = e.vms.GetConsoleLog(ctx(t), &minicloudv1.GetConsoleLogRequest{Name: "web2"})
	wantCode(t, err, codes.Unavailable, "host h2 (agent at "+deadAddr)
}

// TestReportVMStatusTransitions reports every phase on a VM in every phase
// and checks that ReportVMStatus accepts exactly what the lifecycle table
// allows a host, and names the transition when it refuses.
func TestReportVMStatusTransitions(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	c := ctx(t)
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")
	// setPhase writes the stored phase directly, as if the VM had got there.
	setPhase := func(p lifecycle.Phase) {
		t.Helper()
		cur, err := store.GetVM(c, e.etcd, vm.Meta.Id)
		if err != nil {
			t.Fatal(err)
		}
		cur.Status.Phase = p
		op, _ := store.VMStatusOp(vm.Meta.Id, cur.Status)
		if _, err := e.etcd.Do(c, op); err != nil {
			t.Fatal(err)
		}
	}
	for _, from := range lifecycle.Phases[1:] {
		for _, to := range lifecycle.Phases[1:] {
			setPhase(from)
			_, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id,
				Status: &minicloudv1.VMStatus{Phase: to, Message: fmt.Sprintf("%v->%v", from, to)}})
			if lifecycle.Allowed(from, to, lifecycle.Agent) {
				if err != nil {
					t.Errorf("report %s on a %s VM: %v", to, from, err)
					continue
				}
				got, _ := store.GetVM(c, e.etcd, vm.Meta.Id)
				if got.Status.Phase != to {
					t.Errorf("report %s on a %s VM: phase is %s", to, from, got.Status.Phase)
				}
				continue
			}
			wantCode(t, err, codes.FailedPrecondition, lifecycle.PhaseName(from)+" to "+lifecycle.PhaseName(to))
		}
	}
}

// TestConsoleAndStatsNeedARunningVMOnAReachableHost: the API refuses a VM
// that is not RUNNING before asking any host, and names the host it cannot
// reach (the whole path to a real agent is in cmd/minicloud's
// TestE2EConsoleAndStats).
func TestConsoleAndStatsNeedARunningVMOnAReachableHost(t *testing.T) {
	e := newEnv(t)
	e.seed()
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	e.registerHost("h2", deadAddr)
	vm := e.createVM("web1")

	attach := func() error {
		stream, err := e.vms.AttachConsole(ctx(t))
		if err != nil {
			return err
		}
		if err := stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Attach{Attach: &minicloudv1.ConsoleAttach{Name: "web1", Write: true}}}); err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	}
	stats := func() error {
		_, err := e.vms.GetVMStats(ctx(t), &minicloudv1.GetVMStatsRequest{Name: "web1"})
		return err
	}
	wantCode(t, attach(), codes.FailedPrecondition, "VM web1 is PENDING: only a RUNNING VM has a console")
	wantCode(t, stats(), codes.FailedPrecondition, "VM web1 is PENDING")

	e.place(vm.Meta.Id, "h2")
	c := ctx(t)
	for _, p := range []minicloudv1.VMPhase{minicloudv1.VMPhase_VM_PHASE_CREATING, minicloudv1.VMPhase_VM_PHASE_RUNNING} {
		if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: p}}); err != nil {
			t.Fatalf("report %s: %v", p, err)
		}
	}
	wantCode(t, attach(), codes.Unavailable, "host h2 (agent at "+deadAddr)
	wantCode(t, stats(), codes.Unavailable, "host h2 (agent at "+deadAddr)

	if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_STOPPED}}); err != nil {
		t.Fatalf("report STOPPED: %v", err)
	}
	wantCode(t, attach(), codes.FailedPrecondition, "VM web1 is STOPPED; start it first")
}
