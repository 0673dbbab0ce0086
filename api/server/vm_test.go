package server_test

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/store"
)

const sshKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGz3kq8sY9m7HvvTIw1nZ2cQqXkG8e1UuJr2pQ0r3xXb user@host"

func TestCreateVMWritesOneTransaction(t *testing.T) {
	e := newEnv(t)
	e.seed()
	before := e.rev()
	vm := e.createVM("web1", func(r *minicloudv1.CreateVMRequest) {
		r.UserData = []byte("#cloud-config\n")
		r.Spec.SshPublicKeys = []string{sshKey}
	})
	if n := e.writesSince(before); n != 1 {
		t.Fatalf("create took %d etcd revisions, want 1", n)
	}
	s, st := vm.Spec, vm.Status
	if vm.Meta.Project != "default" || s.Hostname != "web1" || s.PowerState != minicloudv1.PowerState_POWER_STATE_RUNNING ||
		fmt.Sprint(s.Networks) != "[default]" || s.Resources.GetMemoryMib() != 1024 || !s.HasUserData || s.UserDataSize != 14 ||
		s.ConfigDriveFormat != "config-2" || s.OnHostFailure != minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_STOP ||
		s.RestartPolicy != minicloudv1.RestartPolicy_RESTART_POLICY_ON_FAILURE {
		t.Fatalf("defaults not filled in: %v", vm)
	}
	if st.Phase != minicloudv1.VMPhase_VM_PHASE_PENDING || len(st.Addresses) != 1 {
		t.Fatalf("status %v", st)
	}
	a := st.Addresses[0]
	if ip, err := netip.ParseAddr(a.Ip); err != nil || !netip.MustParsePrefix("10.99.0.0/24").Contains(ip) || a.Ip == "10.99.0.0" || a.Ip == "10.99.0.1" || a.Ip == "10.99.0.255" ||
		a.PrefixLength != 24 || a.Gateway != "10.99.0.1" || !strings.HasPrefix(a.Mac, "fa:16:3e:") ||
		!strings.HasPrefix(a.Bridge, "mc-") || a.Mtu != 1450 || a.Network != "default" {
		t.Fatalf("address %v", a)
	}
	if vm.Meta.ResourceVersion != before+1 || st.StatusVersion != before+1 {
		t.Fatalf("versions %d/%d, want %d", vm.Meta.ResourceVersion, st.StatusVersion, before+1)
	}
	d := e.dump(t)
	if d[store.VMUserDataKey(vm.Meta.Id)] != "#cloud-config\n" || d[store.VMNameKey("default", "web1")] != vm.Meta.Id {
		t.Fatal("user-data or name index missing")
	}
	got, err := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if err != nil || got.Meta.Id != vm.Meta.Id || got.Meta.ResourceVersion != vm.Meta.ResourceVersion {
		t.Fatalf("get by name: %v %v", got, err)
	}
	if got, err := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: vm.Meta.Id}); err != nil || got.Meta.Name != "web1" {
		t.Fatalf("get by id: %v %v", got, err)
	}
	e.createProjects("other")
	_, err = e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1", Project: "other"})
	wantCode(t, err, codes.NotFound, "vm web1 not found in project other")
	evs, err := e.vms.ListVMEvents(ctx(t), &minicloudv1.ListVMEventsRequest{Name: "web1"})
	if err != nil || len(evs.Events) != 1 || evs.Events[0].Reason != "Created" {
		t.Fatalf("events %v %v", evs, err)
	}
	web2 := e.createVM("web2")
	list, err := e.vms.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{})
	if err != nil || len(list.Vms) != 2 || list.Vms[0].Meta.Name != "web1" || list.Vms[1].Status.Addresses[0].Ip != web2.Status.Addresses[0].Ip || web2.Status.Addresses[0].Ip == a.Ip {
		t.Fatalf("list %v %v", list, err)
	}
	if list, _ := e.vms.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{Project: "other"}); len(list.Vms) != 0 {
		t.Fatalf("project filter leaked %v", list.Vms)
	}
}

// withUnknownField returns req with an extra field number 999 in spec.
func withUnknownField(req *minicloudv1.CreateVMRequest) *minicloudv1.CreateVMRequest {
	unknown := protowire.AppendTag(nil, 999, protowire.VarintType)
	unknown = protowire.AppendVarint(unknown, 1)
	req.Spec.ProtoReflect().SetUnknown(unknown)
	return req
}

func TestCreateVMValidation(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.putImage("big", 10)
	e.createVM("taken")
	ok := func() *minicloudv1.CreateVMRequest {
		return &minicloudv1.CreateVMRequest{Name: "new", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}}
	}
	with := func(f func(*minicloudv1.CreateVMRequest)) *minicloudv1.CreateVMRequest { r := ok(); f(r); return r }
	rows := []struct {
		name     string
		req      *minicloudv1.CreateVMRequest
		code     codes.Code
		fragment string
	}{
		{"uppercase name", with(func(r *minicloudv1.CreateVMRequest) { r.Name = "Web1" }), codes.InvalidArgument, "not a DNS label"},
		{"long name", with(func(r *minicloudv1.CreateVMRequest) { r.Name = strings.Repeat("a", 64) }), codes.InvalidArgument, "1-63 lowercase"},
		{"trailing dash", with(func(r *minicloudv1.CreateVMRequest) { r.Name = "web-" }), codes.InvalidArgument, "not a DNS label"},
		{"no name", with(func(r *minicloudv1.CreateVMRequest) { r.Name = "" }), codes.InvalidArgument, "vm name is required"},
		{"no spec", with(func(r *minicloudv1.CreateVMRequest) { r.Spec = nil }), codes.InvalidArgument, "spec is required"},
		{"no image", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Image = "" }), codes.InvalidArgument, "spec.image is required"},
		{"no flavor", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "" }), codes.InvalidArgument, "spec.flavor is required"},
		{"missing image", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Image = "nope" }), codes.NotFound, "image nope not found"},
		{"missing flavor", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "huge" }), codes.NotFound, "flavor huge not found"},
		{"missing network", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Networks = []string{"default", "dmz"} }), codes.NotFound, "network dmz not found"},
		{"network twice", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Networks = []string{"default", "default"} }), codes.InvalidArgument, "listed twice"},
		{"missing server group", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.ServerGroup = "ha" }), codes.NotFound, "server group ha not found"},
		{"missing target host", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.TargetHost = "h9" }), codes.NotFound, "target host h9"},
		{"user-data too big", with(func(r *minicloudv1.CreateVMRequest) { r.UserData = make([]byte, 64<<10+1) }), codes.InvalidArgument, "limit is 65536"},
		{"bad ssh key", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.SshPublicKeys = []string{"ssh-rsa nonsense"} }), codes.InvalidArgument, "ssh_public_keys[0] is not an SSH public key"},
		{"server-owned field", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Resources = &minicloudv1.Resources{Vcpus: 64} }), codes.InvalidArgument, "spec.resources is set by the server"},
		{"bad config drive format", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.ConfigDriveFormat = "iso" }), codes.InvalidArgument, "config_drive_format"},
		{"bad host failure policy", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.OnHostFailure = 7 }), codes.InvalidArgument, "use STOP or EVACUATE"},
		{"bad restart policy", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.RestartPolicy = 7 }), codes.InvalidArgument, "use ON_FAILURE or NEVER"},
		{"bad hostname", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Hostname = "a..b" }), codes.InvalidArgument, "spec.hostname"},
		{"bad project", with(func(r *minicloudv1.CreateVMRequest) { r.Project = "Team_A" }), codes.InvalidArgument, "project"},
		{"image needs bigger disk", with(func(r *minicloudv1.CreateVMRequest) { r.Spec.Image = "big" }), codes.InvalidArgument, "at least 10 GiB"},
		{"name taken", with(func(r *minicloudv1.CreateVMRequest) { r.Name = "taken" }), codes.AlreadyExists, "vm taken already exists"},
		{"unknown field", withUnknownField(ok()), codes.InvalidArgument, "unknown to this server (in minicloud.v1.VMSpec)"},
		{"oversized request", with(func(r *minicloudv1.CreateVMRequest) { r.UserData = make([]byte, 5<<20) }), codes.ResourceExhausted, "larger than max"},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			before := e.dump(t)
			_, err := e.vms.CreateVM(ctx(t), row.req)
			wantCode(t, err, row.code, row.fragment)
			e.wantUnchanged(t, before)
		})
	}
}

// TestRequestIDIdempotentUnderConcurrentRetries sends one create many times
// at once, as a client retrying over a flaky link would.
func TestRequestIDIdempotentUnderConcurrentRetries(t *testing.T) {
	e := newEnv(t)
	e.seed()
	const retries = 12
	ids := make([]string, retries)
	var wg sync.WaitGroup
	for i := range retries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			vm, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web1", RequestId: "req-1",
				Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}})
			if err != nil {
				t.Errorf("retry %d: %v", i, err)
				return
			}
			ids[i] = vm.Meta.Id
		}()
	}
	wg.Wait()
	for _, id := range ids {
		if id != ids[0] {
			t.Fatalf("retries returned different VMs: %v", ids)
		}
	}
	list, _ := e.vms.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{})
	if len(list.Vms) != 1 {
		t.Fatalf("%d VMs exist, want 1", len(list.Vms))
	}
	// The request-id key is leased so it expires by itself.
	resp, err := e.etcd.Get(ctx(t), store.VMRequestKey("default", "req-1"))
	if id, _ := store.ParseRequestValue(string(resp.Kvs[0].Value)); err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 || id != ids[0] {
		t.Fatalf("request key %v %v", resp, err)
	}
	// The same request id with other parameters is refused, naming the
	// difference, and writes nothing (AWS's IdempotentParameterMismatch).
	for _, c := range []struct {
		req  *minicloudv1.CreateVMRequest
		want string
	}{
		{&minicloudv1.CreateVMRequest{Name: "web2", RequestId: "req-1", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}}, "name web2, not web1"},
		{&minicloudv1.CreateVMRequest{Name: "web1", RequestId: "req-1", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}}, "flavor tiny, not small"},
		{&minicloudv1.CreateVMRequest{Name: "web1", RequestId: "req-1", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}, UserData: []byte("#!/bin/sh\n")}, "other parameters"},
	} {
		before := e.dump(t)
		_, err := e.vms.CreateVM(ctx(t), c.req)
		wantCode(t, err, codes.FailedPrecondition, c.want)
		e.wantUnchanged(t, before)
	}
	// A new request id with the same name is a plain duplicate.
	_, err = e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web1", RequestId: "req-2", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}})
	wantCode(t, err, codes.AlreadyExists, "already exists")
	e.checkConsistent()
}

func TestConcurrentCreatesGetDistinctAddresses(t *testing.T) {
	e := newEnv(t)
	e.seed()
	if _, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "small", Cidr: "10.50.0.0/28"}); err != nil {
		t.Fatal(err)
	}
	const vms = 20 // 13 addresses: some must fail with ResourceExhausted
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		exhausted int
		ips       = map[string]bool{}
	)
	for i := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			vm, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: fmt.Sprintf("vm%d", i),
				Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny", Networks: []string{"small"}}})
			mu.Lock()
			defer mu.Unlock()
			if codes.ResourceExhausted == statusCode(err) {
				exhausted++
				return
			}
			if err != nil {
				t.Errorf("create: %v", err)
				return
			}
			ip := vm.Status.Addresses[0].Ip
			if ips[ip] {
				t.Errorf("address %s given twice", ip)
			}
			ips[ip] = true
		}()
	}
	wg.Wait()
	if len(ips) != 13 || exhausted != vms-13 {
		t.Fatalf("%d created, %d exhausted; want 13 and %d", len(ips), exhausted, vms-13)
	}
	for ip := range ips {
		if !netip.MustParsePrefix("10.50.0.0/28").Contains(netip.MustParseAddr(ip)) || ip == "10.50.0.1" || ip == "10.50.0.15" {
			t.Errorf("bad address %s", ip)
		}
	}
	e.checkConsistent()
}

func TestPowerActionsAndStaleVersions(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1")
	rv := vm.Meta.ResourceVersion
	stopped, err := e.vms.StopVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1", ResourceVersion: rv})
	if err != nil || stopped.Spec.PowerState != minicloudv1.PowerState_POWER_STATE_STOPPED || stopped.Meta.ResourceVersion <= rv {
		t.Fatalf("stop: %v %v", stopped, err)
	}
	before := e.dump(t)
	_, err = e.vms.StartVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1", ResourceVersion: rv})
	wantCode(t, err, codes.Aborted, fmt.Sprintf("request has resource_version %d, current is %d", rv, stopped.Meta.ResourceVersion))
	_, err = e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web1", ResourceVersion: rv})
	wantCode(t, err, codes.Aborted, "read it again")
	_, err = e.vms.RebootVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1"})
	wantCode(t, err, codes.FailedPrecondition, "start it instead")
	e.wantUnchanged(t, before)
	started, err := e.vms.StartVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1", ResourceVersion: stopped.Meta.ResourceVersion})
	if err != nil || started.Spec.PowerState != minicloudv1.PowerState_POWER_STATE_RUNNING {
		t.Fatalf("start: %v %v", started, err)
	}
	rebooted, err := e.vms.RebootVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1"})
	if err != nil || rebooted.Spec.RebootGeneration != 1 {
		t.Fatalf("reboot: %v %v", rebooted, err)
	}
	// Starting a VM whose spec already says RUNNING still writes: the host
	// needs a new resource version to tell a repeated start from an old one.
	again, err := e.vms.StartVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1"})
	if err != nil || again.Meta.ResourceVersion <= rebooted.Meta.ResourceVersion {
		t.Fatalf("repeated start: %v %v", again, err)
	}
	evs, _ := e.vms.ListVMEvents(ctx(t), &minicloudv1.ListVMEventsRequest{Name: "web1"})
	var reasons []string
	for _, ev := range evs.Events {
		reasons = append(reasons, ev.Reason)
	}
	if fmt.Sprint(reasons) != "[Created StopRequested StartRequested RebootRequested StartRequested]" {
		t.Fatalf("events %v", reasons)
	}
}

// TestConcurrentUpdatesWithOneVersion: of many updates sent with the same
// resource version, exactly one wins.
func TestConcurrentUpdatesWithOneVersion(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1")
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		won, lost int
	)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.vms.RebootVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1", ResourceVersion: vm.Meta.ResourceVersion})
			mu.Lock()
			defer mu.Unlock()
			switch statusCode(err) {
			case codes.OK:
				won++
			case codes.Aborted:
				lost++
			default:
				t.Errorf("reboot: %v", err)
			}
		}()
	}
	wg.Wait()
	got, _ := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if won != 1 || lost != 7 || got.Spec.RebootGeneration != 1 {
		t.Fatalf("won %d lost %d generation %d; want 1, 7, 1", won, lost, got.Spec.RebootGeneration)
	}
}

func TestTwoPhaseDelete(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	e.registerHost("h2", "127.0.0.1:1")

	// Not on a host: gone at once, with its address, events and user-data.
	pending := e.createVM("pending", func(r *minicloudv1.CreateVMRequest) { r.UserData = []byte("x") })
	del, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "pending"})
	if err != nil || !del.Spec.DeletionRequested {
		t.Fatalf("delete pending: %v %v", del, err)
	}
	for k := range e.dump(t) {
		if strings.Contains(k, pending.Meta.Id) || strings.HasPrefix(k, store.VMNamePrefix) || strings.HasPrefix(k, store.IPAMPrefix) {
			t.Errorf("key %s survived the delete", k)
		}
	}

	// On a host: DELETING until the host confirms.
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")
	del, err = e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web1"})
	if err != nil || del.Status.Phase != minicloudv1.VMPhase_VM_PHASE_DELETING {
		t.Fatalf("delete: %v %v", del, err)
	}
	got, err := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if err != nil || got.Status.Phase != minicloudv1.VMPhase_VM_PHASE_DELETING || !got.Spec.DeletionRequested {
		t.Fatalf("after delete: %v %v", got, err)
	}
	// Deleting again is harmless; actions are refused.
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.vms.StartVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1"})
	wantCode(t, err, codes.FailedPrecondition, "being deleted")
	// A late report of the host still running it is refused (it learns of
	// the delete from its assignments), and the phase stays DELETING.
	_, err = e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id,
		Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING}})
	wantCode(t, err, codes.FailedPrecondition, "from DELETING to RUNNING")
	if got, _ := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"}); got.Status.Phase != minicloudv1.VMPhase_VM_PHASE_DELETING {
		t.Fatalf("phase %v after a late report, want DELETING", got.Status.Phase)
	}
	// Only its host may confirm.
	_, err = e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: vm.Meta.Id, Deleted: true})
	wantCode(t, err, codes.FailedPrecondition, "assigned to host h1, not to h2")
	if _, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Deleted: true}); err != nil {
		t.Fatal(err)
	}
	_, err = e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	wantCode(t, err, codes.NotFound, "not found")
	for k, v := range e.dump(t) {
		if strings.HasPrefix(k, store.VMEventPrefix) || strings.HasPrefix(k, store.IPAMPrefix) || strings.HasPrefix(k, store.ClaimPrefix) || strings.HasPrefix(k, store.VMNamePrefix) {
			t.Errorf("key %s survived the delete", k)
		}
		if k == store.HostAllocKey("h1") {
			a := &minicloudv1.HostAllocation{}
			if err := unmarshalString(v, a); err != nil || a.VmCount != 0 || a.Allocated.GetMemoryMib() != 0 {
				t.Errorf("allocation of h1 after delete: %v %v", a, err)
			}
		}
	}
	// Confirming a VM that was never deleted is refused.
	vm2 := e.createVM("web2")
	e.place(vm2.Meta.Id, "h1")
	_, err = e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm2.Meta.Id, Deleted: true})
	wantCode(t, err, codes.FailedPrecondition, "report deleted only after DeleteVM")
	e.checkConsistent()
}

// TestDeleteSurvivesDamagedAddressRecords: a VM whose address record was
// lost (or taken over) can still be deleted, and the other VM's record
// stays.
func TestDeleteSurvivesDamagedAddressRecords(t *testing.T) {
	e := newEnv(t)
	e.seed()
	lost := e.createVM("lost")
	taken := e.createVM("taken")
	nw, err := e.nets.GetNetwork(ctx(t), &minicloudv1.GetNetworkRequest{Name: "default"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.etcd.Delete(ctx(t), store.IPAMKey(nw.Meta.Id, lost.Status.Addresses[0].Ip)); err != nil {
		t.Fatal(err)
	}
	takenKey := store.IPAMKey(nw.Meta.Id, taken.Status.Addresses[0].Ip)
	if _, err := e.etcd.Put(ctx(t), takenKey, "someone-else"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"lost", "taken"} {
		if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: name}); err != nil {
			t.Fatalf("delete %s: %v", name, err)
		}
	}
	if d := e.dump(t); d[takenKey] != "someone-else" {
		t.Fatalf("deleting a VM freed an address another VM holds: %q", d[takenKey])
	}
}

// TestVMCannotAttachToAnotherProjectsNetwork: networks belong to a project
// (issue 11), and a VM names its networks within its own project only. A
// VM of one project naming another project's network, by name or by id, is
// told NotFound (never PermissionDenied: the network's existence is not
// revealed) and nothing is written.
func TestVMCannotAttachToAnotherProjectsNetwork(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createProjects("team-a", "team-b")
	bnet, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "bnet", Project: "team-b", Cidr: "10.97.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"bnet", bnet.Meta.Id} {
		before := e.dump(t)
		_, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "intruder", Project: "team-a",
			Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", Networks: []string{ref}}})
		wantCode(t, err, codes.NotFound, fmt.Sprintf("network %s not found in project team-a", ref))
		e.wantUnchanged(t, before)
	}
	// The control: the same request from the network's own project attaches.
	vm := e.createVM("insider", func(r *minicloudv1.CreateVMRequest) { r.Project = "team-b"; r.Spec.Networks = []string{"bnet"} })
	if a := vm.Status.GetAddresses(); len(a) != 1 || a[0].Network != "bnet" || a[0].Bridge != bnet.Bridge {
		t.Fatalf("team-b's VM on its own network: addresses %v", a)
	}
}

// TestLargestLegalSpecAndOneByteOver: every field at its bound makes a
// VM; one byte over any bound is refused and writes nothing (an SSH key's
// comment was once unbounded: a 1 MB spec went through).
func TestLargestLegalSpecAndOneByteOver(t *testing.T) {
	e := newEnv(t)
	e.seed()
	key := func(n int) string { // an authorized_keys line of exactly n bytes
		return sshKey[:strings.LastIndex(sshKey, " ")+1] + strings.Repeat("c", n-strings.LastIndex(sshKey, " ")-1)
	}
	keys := make([]string, 32)
	for i := range keys {
		keys[i] = key(apiserver.MaxSSHKeyBytes)
	}
	half := apiserver.MaxMetadataTotalBytes / 2
	meta := map[string]string{"a": strings.Repeat("x", half-1), "b": strings.Repeat("y", half-1)}
	labels := map[string]string{}
	for i := range 64 {
		labels[fmt.Sprintf("k%02d", i)] = strings.Repeat("v", 255)
	}
	largest := func() *minicloudv1.CreateVMRequest {
		return &minicloudv1.CreateVMRequest{Name: "big", Labels: labels, UserData: make([]byte, apiserver.MaxUserDataBytes),
			Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", SshPublicKeys: slices.Clone(keys), Metadata: meta}}
	}
	for _, c := range []struct {
		what   string
		mutate func(*minicloudv1.CreateVMRequest)
		want   string
	}{
		{"an SSH key one byte over", func(r *minicloudv1.CreateVMRequest) { r.Spec.SshPublicKeys[3] = key(apiserver.MaxSSHKeyBytes + 1) }, "ssh_public_keys[3] is 8193 bytes"},
		{"user-data one byte over", func(r *minicloudv1.CreateVMRequest) { r.UserData = append(r.UserData, 0) }, "user-data is 65537 bytes"},
		{"a 33rd key", func(r *minicloudv1.CreateVMRequest) { r.Spec.SshPublicKeys = append(r.Spec.SshPublicKeys, sshKey) }, "33 SSH keys"},
		{"metadata one byte over", func(r *minicloudv1.CreateVMRequest) {
			r.Spec.Metadata = map[string]string{"a": meta["a"] + "x", "b": meta["b"]}
		}, "metadata is"},
	} {
		req := largest()
		c.mutate(req)
		before := e.dump(t)
		_, err := e.vms.CreateVM(ctx(t), req)
		wantCode(t, err, codes.InvalidArgument, c.want)
		e.wantUnchanged(t, before)
	}
	vm, err := e.vms.CreateVM(ctx(t), largest())
	if err != nil {
		t.Fatalf("the largest legal spec: %v", err)
	}
	if len(vm.Spec.SshPublicKeys) != 32 || proto.Size(vm.Spec) > apiserver.MaxVMSpecBytes {
		t.Fatalf("stored spec: %d keys, %d bytes", len(vm.Spec.SshPublicKeys), proto.Size(vm.Spec))
	}
}

// TestCreateVMKeepsHostFailurePolicies: the policies a create asks for are
// stored (an earlier server dropped them, so every VM was STOP and
// ON_FAILURE whatever the CLI said).
func TestCreateVMKeepsHostFailurePolicies(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1", func(r *minicloudv1.CreateVMRequest) {
		r.Spec.OnHostFailure = minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE
		r.Spec.RestartPolicy = minicloudv1.RestartPolicy_RESTART_POLICY_NEVER
	})
	got, err := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*minicloudv1.VMSpec{vm.Spec, got.Spec} {
		if s.OnHostFailure != minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE || s.RestartPolicy != minicloudv1.RestartPolicy_RESTART_POLICY_NEVER {
			t.Fatalf("policies not kept: %v", s)
		}
	}
}

// TestCreateOnARenumberedNetwork: a create picks candidate addresses from
// the network as an earlier create read it; after the network is deleted
// and created again under the same name with another range, the next
// create must not use those candidates, and gets an address of the new
// range. The delete of a VM releases its address in the same transaction.
func TestCreateOnARenumberedNetwork(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	if _, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "blue", Cidr: "10.70.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	onBlue := func(r *minicloudv1.CreateVMRequest) { r.Spec.Networks = []string{"blue"} }
	for _, name := range []string{"a", "b"} { // the second create folds its probe into its read
		vm := e.createVM(name, onBlue)
		if ip := netip.MustParseAddr(vm.Status.Addresses[0].Ip); !netip.MustParsePrefix("10.70.0.0/24").Contains(ip) {
			t.Fatalf("vm %s got %s, not in 10.70.0.0/24", name, ip)
		}
		if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	for k := range e.dump(t) {
		if strings.HasPrefix(k, store.IPAMPrefix) {
			t.Fatalf("%s left after the VMs were deleted", k)
		}
	}
	if _, err := e.nets.DeleteNetwork(c, &minicloudv1.DeleteNetworkRequest{Name: "blue"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "blue", Cidr: "10.71.0.0/29"}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for i := range 5 { // .2-.6: all of the /29 but network, gateway and broadcast
		vm := e.createVM(fmt.Sprintf("c%d", i), onBlue)
		ip := vm.Status.Addresses[0].Ip
		if !netip.MustParsePrefix("10.71.0.0/29").Contains(netip.MustParseAddr(ip)) || ip == "10.71.0.1" || seen[ip] {
			t.Fatalf("vm c%d got %s on the renumbered 10.71.0.0/29 (given before: %v)", i, ip, seen[ip])
		}
		seen[ip] = true
	}
	_, err := e.vms.CreateVM(c, &minicloudv1.CreateVMRequest{Name: "c5", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", Networks: []string{"blue"}}})
	wantCode(t, err, codes.ResourceExhausted, "network blue (10.71.0.0/29) has no free address")
	e.checkConsistent()
}
