package agent

// Unit tests of the reconcile loop. They need no root: the hypervisor and
// the network are the in-memory fakes that pass their adapters' conformance
// suites (hypervisortest.FakeDriver, networktest.FakeManager), and the API is
// fakeAPI below. The same lifecycle runs against libvirt, the kernel and the
// real API in e2e_test.go.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/hypervisor/hypervisortest"
	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/nic"
)

const testBridge = "mc-0a1b2c3d"

// harness is one agent over fakes, with the assignment stream played by
// fakeAPI: every status the agent reports is merged into the VM the agent
// holds, as the API would store it and stream it back.
type harness struct {
	t     testing.TB
	a     *Agent
	hv    *hypervisortest.FakeHost
	net   *networktest.FakeHost
	api   *fakeAPI
	disks *fakeDisks
	guest *fakeGuestServices
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	return restartHarness(t, nil)
}

// newHarnessWith is newHarness whose guest services are guest (real ones,
// say) instead of the recording fake.
func newHarnessWith(tb testing.TB, guest GuestServices) *harness {
	tb.Helper()
	return startHarness(tb, nil, guest)
}

// restartHarness is a new agent on the host of prev (its state directory,
// domains and links): prev's agent restarted. With prev nil, a new host.
func restartHarness(t *testing.T, prev *harness) *harness {
	t.Helper()
	return startHarness(t, prev, nil)
}

// startHarness starts the agent; each of deps may replace one of its
// fakes (the real network manager, say) before New.
func startHarness(t testing.TB, prev *harness, guest GuestServices, deps ...func(*Deps)) *harness {
	t.Helper()
	h := &harness{
		t:     t,
		hv:    hypervisortest.NewFakeHost(),
		net:   networktest.NewFakeHost(),
		disks: &fakeDisks{},
		guest: &fakeGuestServices{},
	}
	stateDir := t.TempDir()
	if prev != nil {
		h.hv, h.net, stateDir = prev.hv, prev.net, prev.a.cfg.StateDir
	}
	if guest == nil {
		guest = h.guest
	}
	drv := hypervisortest.NewFakeDriver(h.hv)
	t.Cleanup(func() { _ = drv.Close() })
	d := Deps{
		Hypervisor: drv,
		Network:    networktest.NewFakeManager(h.net),
		Disks:      h.disks,
		Images:     fakeImageCache{dir: t.TempDir()},
		Guest:      guest,
	}
	for _, f := range deps {
		f(&d)
	}
	a, err := New(Config{
		HostName:        "host1",
		StateDir:        stateDir,
		ShutdownTimeout: 50 * time.Millisecond,
	}, d, WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	h.api = &fakeAPI{a: a, images: map[string]*minicloudv1.Image{}}
	h.api.images["tiny"] = &minicloudv1.Image{
		Meta:   &minicloudv1.ObjectMeta{Name: "tiny"},
		Format: minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2,
		Disk:   &minicloudv1.ImageBlob{Sha256: "d1", SizeBytes: 1 << 20}, VirtualSizeBytes: 1 << 30,
	}
	a.hosts, a.images = h.api, h.api
	t.Cleanup(func() {
		h.api.mu.Lock()
		defer h.api.mu.Unlock()
		for _, err := range h.api.refused {
			t.Errorf("the agent reported a transition the API refuses: %v", err)
		}
	})
	caps, err := drv.Capabilities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	a.hypervisorKind = preferredHypervisor(caps.Hypervisors)
	a.synced = true // as after the first BOOKMARK of the assignment stream
	h.a = a
	return h
}

// assign adds a VM scheduled to this host, as the assignment stream would.
func (h *harness) assign(power minicloudv1.PowerState) string {
	id := uuid.NewString()
	vm := &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: id, Name: "web", Project: "p1", ResourceVersion: 10},
		Spec: &minicloudv1.VMSpec{
			Image: "tiny", Flavor: "small", PowerState: power,
			Resources: &minicloudv1.Resources{Vcpus: 1, MemoryMib: 128, DiskGib: 1},
		},
		Status: &minicloudv1.VMStatus{
			Phase: minicloudv1.VMPhase_VM_PHASE_SCHEDULED, Host: "host1",
			Addresses: []*minicloudv1.VMAddress{{Network: "default", Bridge: testBridge, Ip: "10.88.0.5",
				PrefixLength: 24, Gateway: "10.88.0.1", Mac: "52:54:00:12:34:56"}},
		},
	}
	h.a.mu.Lock()
	h.a.assigned[id] = &assignment{vm: vm}
	h.a.mu.Unlock()
	return id
}

// updateSpec is a user's write of the spec: a new resource version.
func (h *harness) updateSpec(id string, mutate func(*minicloudv1.VMSpec)) {
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	vm := proto.Clone(h.a.assigned[id].vm).(*minicloudv1.VM)
	mutate(vm.Spec)
	vm.Meta.ResourceVersion++
	h.a.assigned[id].vm = vm
}

// delete is a user's DeleteVM: deletion requested, phase DELETING.
func (h *harness) delete(id string) {
	h.updateSpec(id, func(s *minicloudv1.VMSpec) { s.DeletionRequested = true })
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	h.a.assigned[id].vm.Status.Phase = lifecycle.Deleting
}

func (h *harness) vm(id string) *minicloudv1.VM {
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	as, ok := h.a.assigned[id]
	if !ok {
		return nil
	}
	return as.vm
}

// pass runs one reconcile of id as a worker does (timed, bounded), failures
// counted by the work queue.
func (h *harness) pass(id string) (result, error) {
	h.t.Helper()
	h.a.queue.Add(id)
	key, ok := h.a.queue.Get()
	if !ok || key != id {
		h.t.Fatalf("queue gave %q, %v; want %s", key, ok, id)
	}
	res, err := h.a.reconcilePass(context.Background(), id)
	h.a.queue.Done(id, err, res.RequeueAfter)
	return res, err
}

func (h *harness) mustPass(id string) {
	h.t.Helper()
	if _, err := h.pass(id); err != nil {
		h.t.Fatalf("reconcile %s: %v", id, err)
	}
}

// running creates a VM and converges it to RUNNING.
func (h *harness) running() string {
	h.t.Helper()
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.mustPass(id)
	if got := h.vm(id).GetStatus().GetPhase(); got != minicloudv1.VMPhase_VM_PHASE_RUNNING {
		h.t.Fatalf("phase after create = %s, want RUNNING", got)
	}
	return id
}

func (h *harness) domain(id string) hypervisor.DomainStatus {
	h.t.Helper()
	st, err := hypervisortest.NewFakeDriver(h.hv).Status(context.Background(), id)
	if err != nil {
		h.t.Fatal(err)
	}
	return st
}

func (h *harness) ports(id string) []string {
	h.t.Helper()
	ps, err := networktest.NewFakeManager(h.net).ListPorts(context.Background())
	if err != nil {
		h.t.Fatal(err)
	}
	var out []string
	for _, p := range ps {
		if p.VMID == id {
			out = append(out, p.TapName)
		}
	}
	return out
}

func (h *harness) ops(id string) []string {
	var out []string
	for _, c := range h.hv.Calls(id) {
		out = append(out, c.Op)
	}
	return out
}

func condition(vm *minicloudv1.VM, typ string) *minicloudv1.Condition {
	for _, c := range vm.GetStatus().GetConditions() {
		if c.GetType() == typ {
			return c
		}
	}
	return nil
}

func (h *harness) wantStatus(id string, phase minicloudv1.VMPhase, reason string) {
	h.t.Helper()
	st := h.vm(id).GetStatus()
	if st.GetPhase() != phase || st.GetReason() != reason {
		h.t.Fatalf("status = %s/%s (%s), want %s/%s", st.GetPhase(), st.GetReason(), st.GetMessage(), phase, reason)
	}
}

func TestReconcileCreatesAndIsIdempotent(t *testing.T) {
	h := newHarness(t)
	id := h.running()

	dom := h.domain(id)
	if !dom.Running || dom.Hypervisor != hypervisor.TCG {
		t.Errorf("domain = %+v, want running under tcg", dom)
	}
	spec, _ := h.hv.Spec(id)
	if len(spec.NICs) != 1 || spec.NICs[0].TapName != nic.TapName(id, 0) || spec.NICs[0].MTU != nic.DefaultMTU ||
		spec.NICs[0].MAC.String() != "52:54:00:12:34:56" {
		t.Errorf("domain NICs = %+v", spec.NICs)
	}
	if spec.DiskPath != h.a.diskPath(id) || spec.SMBIOS.UUID != id || spec.SMBIOS.Product != "OpenStack Nova" {
		t.Errorf("domain spec = %+v", spec)
	}
	if p := h.ports(id); len(p) != 1 || p[0] != nic.TapName(id, 0) {
		t.Errorf("ports = %v", p)
	}
	if !h.disks.has(h.a.diskPath(id)) {
		t.Errorf("no overlay at %s", h.a.diskPath(id))
	}
	if g := h.guest.last(); len(g) != 1 || g[0].VM.GetMeta().GetId() != id {
		t.Errorf("guest services were given %d guests, want the VM", len(g))
	}
	vm := h.vm(id)
	for _, typ := range []string{lifecycle.ConditionDiskReady, lifecycle.ConditionNetworkReady, lifecycle.ConditionDomainRunning} {
		if c := condition(vm, typ); c == nil || !c.Status {
			t.Errorf("condition %s = %v, want true", typ, c)
		}
	}
	if c := condition(vm, lifecycle.ConditionGuestReady); c != nil && c.Status {
		t.Errorf("GuestReady before the guest read its metadata: %v", c)
	}
	if vm.GetStatus().GetObservedResourceVersion() != vm.GetMeta().GetResourceVersion() {
		t.Errorf("observed resource version %d, want %d", vm.GetStatus().GetObservedResourceVersion(), vm.GetMeta().GetResourceVersion())
	}

	// The guest reads its metadata: GuestReady, once.
	h.guest.see(id)
	h.mustPass(id)
	if c := condition(h.vm(id), lifecycle.ConditionGuestReady); c == nil || !c.Status || c.Reason != "MetadataRead" {
		t.Errorf("GuestReady after the guest read its metadata: %v", c)
	}

	reports, before := h.api.count(id), h.ops(id)
	for i := 0; i < 3; i++ {
		h.mustPass(id)
	}
	if n := h.api.count(id); n != reports {
		t.Errorf("converged VM: %d more status reports, want none", n-reports)
	}
	if after := h.ops(id); len(after) != len(before) {
		t.Errorf("converged VM: hypervisor calls %v after %v, want none", after[len(before):], before)
	}
}

// TestReconcileAsksForTheImageOnce: passes over a VM whose disk is built
// use the image record it was built from; after the VM is gone, a new VM of
// that name asks again, and gets the image as it is now.
func TestReconcileAsksForTheImageOnce(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	for i := 0; i < 3; i++ {
		h.mustPass(id)
	}
	h.api.mu.Lock()
	gets := h.api.gets
	h.api.mu.Unlock()
	if gets != 1 {
		t.Errorf("%d GetImage calls for one VM over 4 passes, want 1", gets)
	}

	h.delete(id)
	h.mustPass(id)
	h.a.imageRecords.mu.Lock()
	pins := len(h.a.imageRecords.pins)
	h.a.imageRecords.mu.Unlock()
	if pins != 0 {
		t.Errorf("%d image pins left after the VM's delete, want 0", pins)
	}
	// The image is deleted and uploaded again under its name (no VM uses
	// it, so the API allows it): the next VM must be built from the new one.
	h.api.mu.Lock()
	h.api.images["tiny"].Disk.Sha256 = "d2"
	h.api.mu.Unlock()
	id2 := h.running()
	if got := h.disks.backing(h.a.diskPath(id2)); !strings.HasSuffix(got, "/d2") {
		t.Errorf("new VM's disk backed by %q, want the new image d2", got)
	}
}

func TestReconcileReschedulesAfterRepeatedCreateFailures(t *testing.T) {
	h := newHarness(t)
	h.disks.fail(errors.New("qemu-img: disk full"))
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	for i := 1; i < createAttemptsBeforeReschedule; i++ {
		if _, err := h.pass(id); err == nil {
			t.Fatalf("attempt %d: reconcile succeeded with a failing disk", i)
		}
		if r := h.api.last(id); r.GetReschedule() {
			t.Fatalf("attempt %d: rescheduled before %d failures", i, createAttemptsBeforeReschedule)
		}
	}
	if _, err := h.pass(id); err != nil {
		t.Fatalf("last attempt: %v, want the VM given back without error", err)
	}
	r := h.api.last(id)
	if !r.GetReschedule() || len(r.GetEvents()) != 1 || r.GetEvents()[0].GetReason() != "CreateFailed" {
		t.Fatalf("last report = %v, want a reschedule with a CreateFailed event", r)
	}
	if h.vm(id) != nil {
		t.Fatalf("the VM is still assigned after the reschedule")
	}
	if _, err := os.Stat(h.a.vmDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("VM directory left after giving the VM back: %v", err)
	}
	if p := h.ports(id); len(p) != 0 {
		t.Errorf("ports left after giving the VM back: %v", p)
	}
}

func TestReconcileDoesNotRescheduleAVMThatRan(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	h.updateSpec(id, func(s *minicloudv1.VMSpec) { s.RebootGeneration++ })
	h.disks.fail(errors.New("qemu-img: disk full"))
	for i := 0; i < createAttemptsBeforeReschedule+1; i++ {
		if _, err := h.pass(id); err == nil {
			t.Fatalf("attempt %d: reconcile succeeded with a failing disk", i)
		}
	}
	if r := h.api.last(id); r.GetReschedule() {
		t.Fatalf("a VM that ran here was given back to the scheduler: %v", r)
	}
	if !h.domain(id).Running {
		t.Errorf("the running domain was torn down")
	}
}

// A domain that stops on its own (the guest powered off, or crashed) is
// reported, and not started again until the user asks.
func TestReconcileStoppedByGuestOrCrashed(t *testing.T) {
	for _, tc := range []struct {
		reason string
		stop   func(h *hypervisortest.FakeHost, vmID string)
	}{
		{"StoppedByGuest", (*hypervisortest.FakeHost).GuestPowerOff},
		{"Crashed", (*hypervisortest.FakeHost).GuestCrash},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			h := newHarness(t)
			// A guest that shut itself down stays down under any policy;
			// a crash is restarted unless the policy says never
			// (TestRestartPolicy).
			id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
			h.updateSpec(id, func(s *minicloudv1.VMSpec) { s.RestartPolicy = minicloudv1.RestartPolicy_RESTART_POLICY_NEVER })
			h.mustPass(id)
			tc.stop(h.hv, id)
			h.mustPass(id)
			h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_STOPPED, tc.reason)
			if c := condition(h.vm(id), lifecycle.ConditionDomainRunning); c == nil || c.Status || c.Reason != tc.reason {
				t.Errorf("DomainRunning = %v", c)
			}
			if e := h.api.last(id).GetEvents(); len(e) != 1 || e[0].GetType() != "Warning" || e[0].GetReason() != tc.reason {
				t.Errorf("events = %v, want one %s warning", e, tc.reason)
			}
			// The host does not fight the guest: no start until the user asks.
			h.mustPass(id)
			if h.domain(id).Running {
				t.Fatalf("the agent restarted a domain that stopped on its own")
			}
			h.updateSpec(id, func(*minicloudv1.VMSpec) {}) // `minicloud vm start` writes the spec
			h.mustPass(id)
			h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, "Running")
			if !h.domain(id).Running {
				t.Errorf("domain not started again after a new spec")
			}
		})
	}
}

func TestReconcileDomainMissing(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	h.hv.RemoveDomain(hypervisor.DomainName(id))
	defines := len(h.hv.Calls(id))
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_ERROR, "DomainMissing")
	if c := condition(h.vm(id), lifecycle.ConditionDomainRunning); c == nil || c.Status || c.Reason != "DomainMissing" {
		t.Errorf("DomainRunning = %v", c)
	}
	h.mustPass(id)
	if calls := h.hv.Calls(id); len(calls) != defines {
		t.Errorf("the agent acted on a vanished domain: %v", calls[defines:])
	}
	if h.domain(id).Exists {
		t.Errorf("a vanished domain was silently recreated")
	}
}

func TestReconcileStopWaitsForACPIThenDestroys(t *testing.T) {
	for _, tc := range []struct {
		name        string
		handlesACPI bool
		reason      string // the hypervisor's reason for the stop
	}{
		{"guest ignores ACPI", false, "destroyed"},
		{"guest powers off", true, "shutdown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			id := h.running()
			h.hv.SetHandlesACPI(id, tc.handlesACPI)
			h.updateSpec(id, func(s *minicloudv1.VMSpec) { s.PowerState = minicloudv1.PowerState_POWER_STATE_STOPPED })
			h.mustPass(id)
			var shutdown *hypervisortest.Call
			for _, c := range h.hv.Calls(id) {
				if c.Op == "Shutdown" {
					shutdown = &c
				}
			}
			if shutdown == nil || shutdown.Timeout != h.a.cfg.ShutdownTimeout {
				t.Fatalf("calls %v: want a Shutdown with the configured deadline %s", h.hv.Calls(id), h.a.cfg.ShutdownTimeout)
			}
			if dom := h.domain(id); dom.Running || dom.State != hypervisor.StateShutoff || dom.Reason != tc.reason {
				t.Errorf("domain = %+v, want shutoff/%s", dom, tc.reason)
			}
			h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_STOPPED, "Stopped")
			if c := condition(h.vm(id), lifecycle.ConditionDomainRunning); c == nil || c.Status {
				t.Errorf("DomainRunning = %v", c)
			}
			n := len(h.hv.Calls(id))
			h.mustPass(id)
			if calls := h.hv.Calls(id); len(calls) != n {
				t.Errorf("a stopped VM was acted on again: %v", calls[n:])
			}
		})
	}
}

func TestReconcileDeleteConverges(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	other := h.running() // shares the bridge until it is deleted too
	for _, vm := range []string{id, other} {
		h.delete(vm)
		h.mustPass(vm)
		if r := h.api.last(vm); !r.GetDeleted() {
			t.Fatalf("last report of %s = %v, want deleted", vm, r)
		}
		if h.domain(vm).Exists {
			t.Errorf("domain of %s left after delete", vm)
		}
		if p := h.ports(vm); len(p) != 0 {
			t.Errorf("ports of %s left after delete: %v", vm, p)
		}
		if _, err := os.Stat(h.a.vmDir(vm)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("VM directory of %s left after delete: %v", vm, err)
		}
		if h.disks.backing(filepath.Join(h.a.vmDir(vm), "disk.qcow2")) != "" {
			t.Errorf("the disks adapter still remembers %s's disk after its directory went", vm)
		}
		for _, g := range h.guest.last() {
			if g.VM.GetMeta().GetId() == vm {
				t.Errorf("guest services still serve deleted VM %s", vm)
			}
		}
		bridges, _ := networktest.NewFakeManager(h.net).ListBridges(context.Background())
		if vm == id && len(bridges) != 1 {
			t.Errorf("bridges %v while a VM still uses it, want it kept", bridges)
		}
		if vm == other && len(bridges) != 0 {
			t.Errorf("bridges %v left after the last VM on it was deleted", bridges)
		}
		// Again, now that the API forgot the VM: nothing left to do.
		h.mustPass(vm)
	}
	if _, err := os.Stat(filepath.Join(h.a.cfg.StateDir, "bridges", testBridge)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bridge marker left: %v", err)
	}
}

// TestReconcileCleansUpOrphansIntoTheTrash: a VM the API no longer lists
// (not deleted through it: a wrong --api or a restored backup looks the
// same) is stopped, but its disk is kept in the trash for the grace
// period, then removed.
func TestReconcileCleansUpOrphansIntoTheTrash(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	disk := filepath.Join(h.a.vmDir(id), "disk.qcow2")
	if err := os.WriteFile(disk, []byte("the tenant's data"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The API forgot the VM while the agent was away.
	h.a.mu.Lock()
	delete(h.a.assigned, id)
	h.a.mu.Unlock()
	h.mustPass(id)
	if h.domain(id).Exists || len(h.ports(id)) != 0 {
		t.Errorf("orphan left: domain %+v, ports %v", h.domain(id), h.ports(id))
	}
	if _, err := os.Stat(h.a.vmDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("orphan's directory left: %v", err)
	}
	kept, _ := filepath.Glob(filepath.Join(h.a.trashDir(), id+".*", "disk.qcow2"))
	if len(kept) != 1 {
		t.Fatalf("the orphan's disk is not in the trash: %v", kept)
	}
	if b, _ := os.ReadFile(kept[0]); string(b) != "the tenant's data" {
		t.Fatalf("trashed disk holds %q", b)
	}
	h.mustPass(id) // nothing left to do, and the trash stays
	if _, err := os.Stat(kept[0]); err != nil {
		t.Fatalf("trash emptied before the grace period: %v", err)
	}
	h.a.cfg.TrashGrace = time.Nanosecond
	h.a.emptyTrash()
	if _, err := os.Stat(filepath.Dir(kept[0])); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("trash kept after the grace period: %v", err)
	}
}

// TestReconcileRefusedImageIsPermanent: an image agent/disk refuses (its
// bytes are not what the record says, e.g. a VMDK descriptor recorded as
// raw) fails the VM here, neither retried nor handed to another host.
func TestReconcileRefusedImageIsPermanent(t *testing.T) {
	h := newHarness(t)
	h.disks.fail(errdefs.Invalid("image /x: the image looks like a VMDK image or descriptor"))
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	if _, err := h.pass(id); err != nil {
		t.Fatalf("reconcile: %v, want the failure reported, not retried", err)
	}
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_ERROR, "ImageUnusable")
	if r := h.api.last(id); r.GetReschedule() {
		t.Fatalf("a refused image was handed to another host: %v", r)
	}
	if _, err := os.Stat(h.a.vmDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("VM directory left after a refused image: %v", err)
	}
}

func TestReconcilePermanentError(t *testing.T) {
	h := newHarness(t)
	delete(h.api.images, "tiny")
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	if _, err := h.pass(id); err != nil {
		t.Fatalf("reconcile: %v, want the failure reported, not retried", err)
	}
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_ERROR, "ImageNotFound")
	if e := h.api.last(id).GetEvents(); len(e) == 0 || e[len(e)-1].GetReason() != "ImageNotFound" {
		t.Errorf("events = %v, want an ImageNotFound warning", e)
	}
	if _, err := os.Stat(h.a.vmDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("VM directory left after a permanent failure: %v", err)
	}
	// Given up on this spec: no retry until the spec changes.
	reports := h.api.count(id)
	h.mustPass(id)
	if h.api.count(id) != reports || h.domain(id).Exists {
		t.Errorf("a VM in ERROR for its current spec was retried")
	}
}

func TestReconcileInvalidAddressIsPermanent(t *testing.T) {
	h := newHarness(t)
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.a.mu.Lock()
	h.a.assigned[id].vm.Status.Addresses[0].Mac = "not-a-mac"
	h.a.mu.Unlock()
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_ERROR, "AddressInvalid")
}

// fakeAPI plays the API server for one agent: it keeps the reports and
// merges the host-owned status fields into the assignment, as
// ReportVMStatus followed by the assignment stream would.
type fakeAPI struct {
	minicloudv1.HostServiceClient  // other methods are not used by reconcile
	minicloudv1.ImageServiceClient // likewise
	a                              *Agent

	mu      sync.Mutex
	reports []*minicloudv1.ReportVMStatusRequest
	refused []error // transitions the real API would refuse
	// lag: the assignment stream has not delivered the reports yet (they
	// are taken, and checked against the VM as it is, but not merged).
	lag    bool
	images map[string]*minicloudv1.Image
	gets   int // GetImage calls
}

func (f *fakeAPI) GetImage(_ context.Context, req *minicloudv1.GetImageRequest, _ ...grpc.CallOption) (*minicloudv1.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gets++
	img, ok := f.images[req.GetName()]
	if !ok {
		return nil, errdefs.ToGRPC(errdefs.NotFound("image %q not found", req.GetName()))
	}
	return proto.Clone(img).(*minicloudv1.Image), nil
}

func (f *fakeAPI) ReportVMStatus(_ context.Context, req *minicloudv1.ReportVMStatusRequest, _ ...grpc.CallOption) (*minicloudv1.ReportVMStatusResponse, error) {
	f.mu.Lock()
	f.reports = append(f.reports, proto.Clone(req).(*minicloudv1.ReportVMStatusRequest))
	f.mu.Unlock()
	if req.GetReleasedConfirmed() {
		return &minicloudv1.ReportVMStatusResponse{}, nil
	}

	a := f.a
	a.mu.Lock()
	defer a.mu.Unlock()
	as, ok := a.assigned[req.GetVmId()]
	if !ok {
		return nil, errdefs.ToGRPC(errdefs.NotFound("vm %s not found", req.GetVmId()))
	}
	// The transitions the API allows a host (pkg/lifecycle), so a report
	// the real API would refuse fails the test (see newHarness).
	cur := as.vm.GetStatus().GetPhase()
	next := proto.Clone(as.vm).(*minicloudv1.VM)
	var err error
	switch {
	case req.GetDeleted():
		err = lifecycle.Check(cur, lifecycle.None, lifecycle.Agent)
	default:
		if req.GetStatus() != nil {
			lifecycle.MergeHostStatus(next.Status, req.GetStatus())
			err = lifecycle.Check(cur, next.Status.GetPhase(), lifecycle.Agent)
		}
		if err == nil && req.GetReschedule() {
			err = lifecycle.Check(next.Status.GetPhase(), lifecycle.Pending, lifecycle.API)
		}
	}
	if err != nil {
		f.mu.Lock()
		f.refused = append(f.refused, err)
		f.mu.Unlock()
		return nil, errdefs.ToGRPC(errdefs.FailedPrecondition("vm %s: %v", req.GetVmId(), err))
	}
	if req.GetDeleted() || req.GetReschedule() {
		delete(a.assigned, req.GetVmId()) // the stream sends DELETED
		return &minicloudv1.ReportVMStatusResponse{}, nil
	}
	f.mu.Lock()
	lag := f.lag
	f.mu.Unlock()
	if !lag {
		as.vm = next
	}
	return &minicloudv1.ReportVMStatusResponse{}, nil
}

func (f *fakeAPI) count(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, r := range f.reports {
		if r.GetVmId() == id {
			n++
		}
	}
	return n
}

func (f *fakeAPI) last(id string) *minicloudv1.ReportVMStatusRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.reports) - 1; i >= 0; i-- {
		if f.reports[i].GetVmId() == id {
			return f.reports[i]
		}
	}
	return nil
}

// fakeDisks makes empty files for overlays, or fails when told to.
type fakeDisks struct {
	mu       sync.Mutex
	err      error
	backings map[string]string // overlay path -> backing path
	// gate, if set, runs before an overlay is made (without mu held).
	gate func() error
}

func (d *fakeDisks) fail(err error) { d.mu.Lock(); d.err = err; d.mu.Unlock() }

func (d *fakeDisks) CreateOverlay(_ context.Context, path, backing, _ string, _ int64) error {
	d.mu.Lock()
	gate := d.gate
	d.mu.Unlock()
	if gate != nil {
		if err := gate(); err != nil {
			return err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return d.err
	}
	if d.backings == nil {
		d.backings = map[string]string{}
	}
	d.backings[path] = backing
	return os.WriteFile(path, nil, 0o600)
}

// ForgetUnder drops the overlays inside dir from what the fake remembers,
// as the real adapter drops its header memo.
func (d *fakeDisks) ForgetUnder(dir string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for p := range d.backings {
		if strings.HasPrefix(p, dir+string(filepath.Separator)) {
			delete(d.backings, p)
		}
	}
}

func (d *fakeDisks) backing(path string) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.backings[path]
}

func (d *fakeDisks) has(path string) bool { _, err := os.Stat(path); return err == nil }

// fakeImageCache "downloads" a part as an empty file named by its digest.
type fakeImageCache struct{ dir string }

func (c fakeImageCache) Ensure(_ context.Context, _ string, _ minicloudv1.ImagePart, sha256 string) (string, error) {
	p := filepath.Join(c.dir, sha256)
	return p, os.WriteFile(p, nil, 0o600)
}

// fakeGuestServices keeps the guests it is given and plays the metadata
// service's GuestSeen.
type fakeGuestServices struct {
	mu      sync.Mutex
	guests  map[string]Guest
	seen    map[string]time.Time
	updates []guestUpdate // every UpdateGuests call, by VM ids
}

type guestUpdate struct{ upsert, remove []string }

func (g *fakeGuestServices) UpdateGuests(_ context.Context, upsert []Guest, remove []string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.guests == nil {
		g.guests = map[string]Guest{}
	}
	u := guestUpdate{remove: slices.Sorted(slices.Values(remove))}
	for _, gu := range upsert {
		u.upsert = append(u.upsert, gu.VM.GetMeta().GetId())
	}
	slices.Sort(u.upsert)
	g.updates = append(g.updates, u)
	for _, id := range remove {
		delete(g.guests, id)
	}
	for _, gu := range upsert {
		g.guests[gu.VM.GetMeta().GetId()] = gu
	}
	return nil
}

func (g *fakeGuestServices) BuildConfigDrive(_ context.Context, _ Guest, path string) error {
	return os.WriteFile(path, nil, 0o600)
}

func (g *fakeGuestServices) GuestSeen(vmID string) (time.Time, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	t, ok := g.seen[vmID]
	return t, ok
}

func (g *fakeGuestServices) see(vmID string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.seen == nil {
		g.seen = map[string]time.Time{}
	}
	g.seen[vmID] = time.Now()
}

// lastUpdate is the last UpdateGuests call.
func (g *fakeGuestServices) lastUpdate() guestUpdate {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.updates) == 0 {
		return guestUpdate{}
	}
	return g.updates[len(g.updates)-1]
}

// last is the guests served, by VM id.
func (g *fakeGuestServices) last() []Guest {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := slices.Collect(maps.Values(g.guests))
	slices.SortFunc(out, func(a, b Guest) int { return strings.Compare(a.VM.GetMeta().GetId(), b.VM.GetMeta().GetId()) })
	return out
}

// TestPublishSendsOnlyWhatChanged: a reconcile pass hands the guest services
// its own VM, not the host's whole set; a deletion removes the VM at once;
// an assignment change (here: a VM pruned at a BOOKMARK) is sent by the
// next publish, whoever makes it.
func TestPublishSendsOnlyWhatChanged(t *testing.T) {
	h := newHarness(t)
	a, b, c := h.running(), h.running(), h.running()
	if got := h.guest.last(); len(got) != 3 {
		t.Fatalf("guest services serve %d VMs, want 3", len(got))
	}
	h.mustPass(b)
	if u := h.guest.lastUpdate(); !slices.Equal(u.upsert, []string{b}) || len(u.remove) != 0 {
		t.Errorf("a pass of one VM of three sent %+v, want that VM only", u)
	}
	h.delete(c)
	h.mustPass(c)
	if u := h.guest.lastUpdate(); !slices.Contains(u.remove, c) || len(u.upsert) != 0 {
		t.Errorf("the pass that deleted a VM sent %+v, want its removal", u)
	}
	for _, g := range h.guest.last() {
		if g.VM.GetMeta().GetId() == c {
			t.Errorf("deleted VM %s still served", c)
		}
	}
	// The stream no longer lists a (pruned at its BOOKMARK).
	h.a.mu.Lock()
	delete(h.a.assigned, a)
	h.a.guestsDirty[a] = true
	h.a.mu.Unlock()
	h.mustPass(b)
	if u := h.guest.lastUpdate(); !slices.Equal(u.remove, []string{a}) || !slices.Equal(u.upsert, []string{b}) {
		t.Errorf("the next pass sent %+v, want %s upserted and %s removed", u, b, a)
	}
	if got := h.guest.last(); len(got) != 1 || got[0].VM.GetMeta().GetId() != b {
		t.Errorf("guest services serve %v, want only %s", guestIDs(got), b)
	}
}

// TestConcurrentCreatesShareTheBridge: creates of one network run their
// bridge step at once (bridgeMu is a read lock for them) while the bridge
// collection, which runs after every delete, waits for them: every VM ends
// RUNNING on the one bridge, which collection keeps while VMs use it.
func TestConcurrentCreatesShareTheBridge(t *testing.T) {
	h := newHarness(t)
	const vms = 10
	ids := make([]string, vms)
	for i := range ids {
		ids[i] = h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
		h.a.mu.Lock()
		addr := h.a.assigned[ids[i]].vm.Status.Addresses[0]
		addr.Ip = fmt.Sprintf("10.88.0.%d", 10+i)
		addr.Mac = fmt.Sprintf("52:54:00:12:34:%02x", 0x10+i)
		h.a.mu.Unlock()
	}
	var wg sync.WaitGroup
	errs := make([]error, vms+1)
	for i, id := range ids {
		wg.Go(func() { _, errs[i] = h.a.reconcilePass(context.Background(), id) })
	}
	wg.Go(func() { errs[vms] = h.a.collectBridges(context.Background()) })
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	for _, id := range ids {
		h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, lifecycle.ReasonRunning)
		if p := h.ports(id); len(p) != 1 {
			t.Errorf("ports of %s: %v, want one", id, p)
		}
	}
	bridges, _ := networktest.NewFakeManager(h.net).ListBridges(context.Background())
	if len(bridges) != 1 || bridges[0].Name != testBridge {
		t.Errorf("bridges %v, want %s alone", bridges, testBridge)
	}
	if _, err := os.Stat(filepath.Join(h.a.cfg.StateDir, "bridges", testBridge)); err != nil {
		t.Errorf("bridge marker: %v", err)
	}
}

// TestCreateBuildsDiskAndNetworkAtOnce: the CREATING report of a slow
// create (one that outlasts creatingReportDelay, zero here), the disk and
// the network run at the same time (the disk here waits until the port
// exists and the API has the CREATING report), and the outcome is what the
// steps in a row gave: CREATING reported first, then RUNNING with
// DiskReady and NetworkReady.
func TestCreateBuildsDiskAndNetworkAtOnce(t *testing.T) {
	h := newHarness(t)
	h.a.creatingReportDelay = 0
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.disks.gate = func() error {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			h.api.mu.Lock()
			reported := len(h.api.reports) > 0
			h.api.mu.Unlock()
			if reported && len(h.ports(id)) == 1 {
				return nil
			}
			time.Sleep(time.Millisecond)
		}
		return errors.New("the port and the CREATING report did not come while the disk was being made")
	}
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, lifecycle.ReasonRunning)
	h.api.mu.Lock()
	reports := slices.Clone(h.api.reports)
	h.api.mu.Unlock()
	if len(reports) != 2 || reports[0].GetStatus().GetPhase() != lifecycle.Creating || reports[1].GetStatus().GetPhase() != lifecycle.Running {
		t.Fatalf("reports %v, want CREATING then RUNNING", reports)
	}
	var reasons []string
	for _, e := range reports[1].GetEvents() {
		reasons = append(reasons, e.GetReason())
	}
	for _, want := range []string{lifecycle.ReasonDiskReady, lifecycle.ReasonNetworkReady, lifecycle.ReasonStarted} {
		if !slices.Contains(reasons, want) {
			t.Errorf("events of the RUNNING report %v lack %s", reasons, want)
		}
	}
}

// defineGate makes the disk step wait until the VM's domain is defined:
// the define must not wait for the overlay.
func (h *harness) defineGate(id string) {
	h.disks.gate = func() error {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if h.domain(id).Exists {
				return nil
			}
		}
		return errors.New("the domain was not defined while the disk was being made")
	}
}

// TestCreateDefinesTheDomainBesideTheDisk: the domain is defined once the
// boot media are known, while the overlay is still being made, and starts
// once disk and network are there.
func TestCreateDefinesTheDomainBesideTheDisk(t *testing.T) {
	h := newHarness(t)
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.defineGate(id)
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, lifecycle.ReasonRunning)
	if ops := h.ops(id); slices.Index(ops, "Define") < 0 || slices.Index(ops, "Define") > slices.Index(ops, "Start") {
		t.Fatalf("hypervisor calls %v, want Define before Start", ops)
	}
	// A later pass defines nothing again.
	defines := func() int {
		n := 0
		for _, op := range h.ops(id) {
			if op == "Define" {
				n++
			}
		}
		return n
	}
	h.disks.gate = nil
	h.mustPass(id)
	if n := defines(); n != 1 {
		t.Fatalf("%d defines after two passes, want 1", n)
	}
}

// TestAFailedCreateUndoesItsDefine: a create whose network is refused or
// whose disk fails after the domain was defined beside them leaves no
// domain behind, as when the define came last; the next pass defines it
// again.
func TestAFailedCreateUndoesItsDefine(t *testing.T) {
	h := newHarness(t)
	h.net.SetRoutes(map[netip.Prefix]string{netip.MustParsePrefix("10.88.0.0/16"): "eth1"})
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.defineGate(id)
	var hc *network.HostConflictError
	if _, err := h.pass(id); !errors.As(err, &hc) {
		t.Fatalf("reconcile: %v, want the host-route conflict", err)
	}
	if ops := h.ops(id); !slices.Contains(ops, "Define") || h.domain(id).Exists {
		t.Fatalf("after a refused network: calls %v, domain %+v; want it defined, then undefined", ops, h.domain(id))
	}

	h2 := newHarness(t)
	id2 := h2.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h2.defineGate(id2)
	defined := h2.disks.gate
	h2.disks.gate = func() error {
		if err := defined(); err != nil {
			return err
		}
		return errors.New("disk full")
	}
	if _, err := h2.pass(id2); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("reconcile: %v, want the disk's failure", err)
	}
	if h2.domain(id2).Exists {
		t.Fatalf("after a failed disk: domain %+v, want none", h2.domain(id2))
	}
	h2.disks.gate = nil
	h2.mustPass(id2)
	h2.wantStatus(id2, minicloudv1.VMPhase_VM_PHASE_RUNNING, lifecycle.ReasonRunning)
}

// gatedStatus is a hypervisor whose Status calls wait for gate.
type gatedStatus struct {
	hypervisor.Driver
	gate func() error
}

func (g *gatedStatus) Status(ctx context.Context, id string) (hypervisor.DomainStatus, error) {
	if g.gate != nil {
		if err := g.gate(); err != nil {
			return hypervisor.DomainStatus{}, err
		}
	}
	return g.Driver.Status(ctx, id)
}

// createWhileStatusWaits runs a new VM's first pass with its Status call
// held until until says what it waits for happened (or fails): that must
// happen beside the look at the domain, not after it. The 10 s bound is a
// guard against a hang; it times nothing.
func createWhileStatusWaits(t *testing.T, what string, until func(h *harness, id string) (bool, error)) {
	t.Helper()
	var gs *gatedStatus
	h := startHarness(t, nil, nil, func(d *Deps) {
		gs = &gatedStatus{Driver: d.Hypervisor}
		d.Hypervisor = gs
	})
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	gs.gate = func() error {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if done, err := until(h, id); err != nil || done {
				return err
			}
		}
		return fmt.Errorf("%s did not happen while the domain was looked at", what)
	}
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, lifecycle.ReasonRunning)
}

// TestCreateAsksForTheImageBesideTheDomainStatus: a new VM's image record
// is asked for while libvirt is asked about the domain, not after.
func TestCreateAsksForTheImageBesideTheDomainStatus(t *testing.T) {
	createWhileStatusWaits(t, "the image lookup", func(h *harness, _ string) (bool, error) {
		h.api.mu.Lock()
		defer h.api.mu.Unlock()
		return h.api.gets > 0, nil
	})
}

// TestCreatePlugsThePortBesideTheDomainStatus: a new VM's network step
// runs while libvirt is asked about the domain, not after.
func TestCreatePlugsThePortBesideTheDomainStatus(t *testing.T) {
	createWhileStatusWaits(t, "the port", func(h *harness, id string) (bool, error) {
		return len(h.ports(id)) == 1, nil
	})
}

// TestCreateMakesTheDiskBesideTheDomainStatus: a new VM's overlay is made
// while libvirt is asked about the domain, not after; the define still
// waits for the answer.
func TestCreateMakesTheDiskBesideTheDomainStatus(t *testing.T) {
	createWhileStatusWaits(t, "the overlay", func(h *harness, id string) (bool, error) {
		h.disks.mu.Lock()
		_, made := h.disks.backings[h.a.diskPath(id)]
		h.disks.mu.Unlock()
		if made && slices.Contains(h.ops(id), "Define") {
			return false, errors.New("the domain was defined before libvirt was asked about it")
		}
		return made, nil
	})
}

// TestCreatesShareTheImageRecordOfAnAssignedVM: further VMs of an image on
// a host ask the API for no record while a VM pinned to it is assigned.
func TestCreatesShareTheImageRecordOfAnAssignedVM(t *testing.T) {
	h := newHarness(t)
	gets := func() int {
		h.api.mu.Lock()
		defer h.api.mu.Unlock()
		return h.api.gets
	}
	first := h.running()
	h.running()
	if n := gets(); n != 1 {
		t.Fatalf("%d GetImage calls for two VMs of one image, want 1", n)
	}
	h.delete(first)
	h.mustPass(first)
	h.a.mu.Lock()
	delete(h.a.assigned, first) // the stream's DELETED after the report
	h.a.mu.Unlock()
	h.running()
	if n := gets(); n != 1 {
		t.Fatalf("%d GetImage calls for a third VM beside the second, want still 1", n)
	}
}

// reasons are the reasons of events, in order.
func reasons(events []*minicloudv1.Event) []string {
	var out []string
	for _, e := range events {
		out = append(out, e.GetReason())
	}
	return out
}

// TestFastCreateReportsCreatingWithRunning: a create that ends within
// creatingReportDelay sends one report, SCHEDULED → RUNNING, whose events
// are the whole create in order, CREATING first.
func TestFastCreateReportsCreatingWithRunning(t *testing.T) {
	h := newHarness(t)
	h.a.creatingReportDelay = time.Hour
	id := h.running()
	if n := h.api.count(id); n != 1 {
		t.Fatalf("%d reports for a fast create, want 1", n)
	}
	r := h.api.last(id)
	want := []string{lifecycle.ReasonCreating, lifecycle.ReasonDiskReady, lifecycle.ReasonNetworkReady, lifecycle.ReasonStarted}
	if got := reasons(r.GetEvents()); !slices.Equal(got, want) {
		t.Errorf("events of the report %v, want %v", got, want)
	}
	for _, typ := range []string{lifecycle.ConditionDiskReady, lifecycle.ConditionNetworkReady, lifecycle.ConditionDomainRunning} {
		if c := condition(h.vm(id), typ); c == nil || !c.Status {
			t.Errorf("condition %s = %v, want true", typ, c)
		}
	}
}

// TestFailingCreateStillReportsCreating: a create whose pass fails before
// the delay reports CREATING on its way out, once: the VM shows that its
// host works on it while the host retries.
func TestFailingCreateStillReportsCreating(t *testing.T) {
	h := newHarness(t)
	h.a.creatingReportDelay = time.Hour
	h.disks.fail(errors.New("qemu-img: disk full"))
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	for i := 0; i < 2; i++ {
		if _, err := h.pass(id); err == nil {
			t.Fatalf("pass %d succeeded with a failing disk", i)
		}
	}
	if n := h.api.count(id); n != 1 {
		t.Fatalf("%d reports after two failed passes, want the CREATING one", n)
	}
	if r := h.api.last(id); r.GetStatus().GetPhase() != lifecycle.Creating || !slices.Equal(reasons(r.GetEvents()), []string{lifecycle.ReasonCreating}) {
		t.Errorf("report %v, want CREATING with its event", r)
	}
	h.disks.fail(nil)
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, lifecycle.ReasonRunning)
	if got := reasons(h.api.last(id).GetEvents()); slices.Contains(got, lifecycle.ReasonCreating) {
		t.Errorf("the RUNNING report repeats CREATING: %v", got)
	}
}

// TestPassBeforeTheStreamCatchesUp: after a fast create's one report, a
// pass that still sees the VM SCHEDULED (a domain event came before the
// stream delivered the report) creates nothing and reports nothing again,
// and reports the domain missing if it vanished; a VM placed anew (a new
// assignment epoch) is created again.
func TestPassBeforeTheStreamCatchesUp(t *testing.T) {
	h := newHarness(t)
	h.a.creatingReportDelay = time.Hour
	h.api.mu.Lock()
	h.api.lag = true
	h.api.mu.Unlock()
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.mustPass(id)
	reports, ops := h.api.count(id), len(h.ops(id))
	h.mustPass(id)
	if n := h.api.count(id); n != reports {
		t.Errorf("%d more reports from a pass over a VM the stream still shows SCHEDULED: %v", n-reports, h.api.last(id))
	}
	if after := h.ops(id); len(after) != ops {
		t.Errorf("hypervisor calls %v on the second pass, want none", after[ops:])
	}

	// The domain vanishes before the stream delivers the report: it is
	// reported missing, as for a VM the stream shows RUNNING, not made
	// again.
	h.hv.RemoveDomain(hypervisor.DomainName(id))
	h.mustPass(id)
	if r := h.api.last(id); r.GetStatus().GetPhase() != lifecycle.Error || r.GetStatus().GetReason() != lifecycle.ReasonDomainMissing {
		t.Errorf("report after the domain vanished: %v, want ERROR/DomainMissing", r.GetStatus())
	}
	if h.domain(id).Exists {
		t.Errorf("a vanished domain was made again")
	}

	// Placed again on this host, as after an evacuation: that SCHEDULED
	// is newer than the report, whose copy is destroyed and built anew.
	h.a.mu.Lock()
	h.a.assigned[id].vm.Status.AssignmentEpoch++
	h.a.mu.Unlock()
	h.mustPass(id)
	if got := reasons(h.api.last(id).GetEvents()); len(got) == 0 || got[0] != lifecycle.ReasonCreating {
		t.Errorf("events of the create of the new placement %v, want CREATING first", got)
	}
}
