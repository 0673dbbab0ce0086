// Package hypervisortest is the conformance suite of hypervisor.Driver: the
// behaviour the agent's reconcile loop relies on, run against every
// implementation (the libvirt driver on real QEMU, and FakeDriver, the
// in-memory driver of the reconcile loop's unit tests), in the style of
// containerd's snapshotter testsuite.
package hypervisortest

import (
	"bytes"
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/nic"
)

// Fixtures adapt the suite to one implementation.
type Fixtures struct {
	// NewSpec returns a bootable spec for vmID whose files (disk, kernel,
	// console log directory) exist; it registers its own cleanup.
	NewSpec func(t *testing.T, vmID string) hypervisor.DomainSpec

	// BootMarker appears in the console log once per boot of the guest
	// NewSpec describes. Empty skips the console checks.
	BootMarker string
	// ReadyMarker appears once the guest handles the ACPI power button;
	// empty means the guest never does (graceful shutdown is not tested).
	ReadyMarker string

	// ShellMarker appears in the console log once the guest runs a shell
	// on its serial console (one that answers `echo`); empty means the
	// shell is there as soon as the domain runs.
	ShellMarker string

	// Observe asks the hypervisor itself, not the driver, whether any
	// domain for vmID exists (e.g. virsh dominfo), to check that Undefine
	// leaves nothing behind.
	Observe func(t *testing.T, vmID string) bool

	// DefineForeign defines a domain named name without minicloud's
	// metadata, as another tool on the host would, and registers its
	// cleanup. Nil skips the foreign-domain checks.
	DefineForeign func(t *testing.T, name string)

	// BootTimeout bounds waiting for markers (default 6 min: TCG on a
	// loaded 2-core host can take minutes to boot even the tiny guest).
	BootTimeout time.Duration
}

// RunConformance runs the suite. Each subtest uses its own VM id and cleans
// up after itself.
func RunConformance(t *testing.T, newDriver func(t *testing.T) hypervisor.Driver, fx Fixtures) {
	if fx.BootTimeout == 0 {
		fx.BootTimeout = 6 * time.Minute
	}
	s := &suite{newDriver: newDriver, fx: fx}
	t.Run("Capabilities", s.capabilities)
	t.Run("StatusOfUnknownVMIsAbsent", s.statusAbsent)
	t.Run("InvalidSpecIsRejected", s.invalidSpec)
	t.Run("DefineIsIdempotent", s.defineIdempotent)
	t.Run("StartRunsAndEmitsEvents", s.startRuns)
	t.Run("ShutdownFallsBackToDestroy", s.shutdownForced)
	t.Run("ShutdownGraceful", s.shutdownGraceful)
	t.Run("DestroyAndRestart", s.destroyRestart)
	t.Run("Reboot", s.reboot)
	t.Run("UndefineLeavesNothing", s.undefine)
	t.Run("HostileNamesStayData", s.hostileNames)
	t.Run("ListOnlyTagged", s.listOnlyTagged)
	t.Run("Console", s.console)
	t.Run("Stats", s.stats)
}

type suite struct {
	newDriver func(t *testing.T) hypervisor.Driver
	fx        Fixtures
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// defined defines a fresh VM and registers an Undefine for cleanup.
func (s *suite) defined(t *testing.T, d hypervisor.Driver, mutate ...func(*hypervisor.DomainSpec)) hypervisor.DomainSpec {
	t.Helper()
	id := uuid.NewString()
	spec := s.fx.NewSpec(t, id)
	for _, m := range mutate {
		m(&spec)
	}
	ctx := ctxFor(t, time.Minute)
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := d.Undefine(ctx, id); err != nil {
			t.Errorf("cleanup: Undefine %s: %v", id, err)
		}
	})
	return spec
}

func (s *suite) capabilities(t *testing.T) {
	d := s.newDriver(t)
	caps, err := d.Capabilities(ctxFor(t, time.Minute))
	if err != nil {
		t.Fatalf("Capabilities: %v", err)
	}
	if caps.VCPUs < 1 || caps.MemoryMiB < 64 {
		t.Errorf("capabilities %+v: want vCPUs >= 1 and memory >= 64 MiB", caps)
	}
	if len(caps.Hypervisors) == 0 {
		t.Fatalf("capabilities %+v: no hypervisor", caps)
	}
	for _, h := range caps.Hypervisors {
		if h != hypervisor.KVM && h != hypervisor.TCG {
			t.Errorf("unknown hypervisor %q", h)
		}
	}
	hasKVM := caps.Hypervisors[0] == hypervisor.KVM
	if !hasKVM && caps.KVMUnusable == "" {
		t.Errorf("KVM not offered but no reason given: %+v", caps)
	}
}

func (s *suite) statusAbsent(t *testing.T) {
	d := s.newDriver(t)
	id := uuid.NewString()
	st, err := d.Status(ctxFor(t, time.Minute), id)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Exists || st.Running || st.State != hypervisor.StateAbsent {
		t.Errorf("Status of unknown vm = %+v, want absent", st)
	}
	ctx := ctxFor(t, time.Minute)
	if err := d.Undefine(ctx, id); err != nil {
		t.Errorf("Undefine of absent vm: %v", err)
	}
	if err := d.Destroy(ctx, id); err != nil {
		t.Errorf("Destroy of absent vm: %v", err)
	}
	if err := d.Start(ctx, id); !errdefs.IsNotFound(err) {
		t.Errorf("Start of absent vm: %v, want NotFound", err)
	}
}

func (s *suite) invalidSpec(t *testing.T) {
	d := s.newDriver(t)
	ctx := ctxFor(t, time.Minute)
	good := s.fx.NewSpec(t, uuid.NewString())
	cases := map[string]func(*hypervisor.DomainSpec){
		"id not a uuid":  func(s *hypervisor.DomainSpec) { s.VMID = "../../etc" },
		"upper-case id":  func(s *hypervisor.DomainSpec) { s.VMID = strings.ToUpper(s.VMID) },
		"no vcpus":       func(s *hypervisor.DomainSpec) { s.VCPUs = 0 },
		"tiny memory":    func(s *hypervisor.DomainSpec) { s.MemoryMiB = 1 },
		"bad hypervisor": func(s *hypervisor.DomainSpec) { s.Hypervisor = "xen" },
		"relative disk":  func(s *hypervisor.DomainSpec) { s.DiskPath = "disk.qcow2" },
		"bad format":     func(s *hypervisor.DomainSpec) { s.DiskFormat = "vmdk" },
		"relative log":   func(s *hypervisor.DomainSpec) { s.ConsoleLogPath = "console.log" },
		"bad mac": func(s *hypervisor.DomainSpec) {
			s.NICs = []nic.NIC{{MAC: net.HardwareAddr{0x52, 0x54}, TapName: "mct0"}}
		},
		"long tap": func(s *hypervisor.DomainSpec) {
			s.NICs = []nic.NIC{{MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, TapName: "mct0123456789abcdef"}}
		},
		"smbios uuid": func(s *hypervisor.DomainSpec) { s.SMBIOS.UUID = uuid.NewString() },
		"cmdline, no kern": func(s *hypervisor.DomainSpec) {
			s.KernelPath, s.InitrdPath, s.Cmdline = "", "", "console=ttyS0"
		},
	}
	t.Cleanup(func() { _ = d.Undefine(context.Background(), good.VMID) }) // in case a case wrongly succeeds
	for name, mutate := range cases {
		spec := good
		spec.NICs = append([]nic.NIC(nil), good.NICs...)
		mutate(&spec)
		err := d.Define(ctx, spec)
		if !errdefs.IsInvalid(err) {
			t.Errorf("%s: Define = %v, want Invalid", name, err)
		}
	}
	if st, err := d.Status(ctx, good.VMID); err != nil || st.Exists {
		t.Errorf("after rejected defines: Status = %+v, %v; want absent", st, err)
	}
}

func (s *suite) defineIdempotent(t *testing.T) {
	d := s.newDriver(t)
	ctx := ctxFor(t, time.Minute)
	spec := s.defined(t, d)
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("second Define: %v", err)
	}
	spec.MemoryMiB += 64
	spec.Epoch = 7 // a redefinition for a new assignment epoch keeps it in metadata
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define with more memory: %v", err)
	}
	list, err := d.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	n := 0
	for _, st := range list {
		if st.VMID == spec.VMID {
			n++
			if !st.Exists || st.Running || st.State != hypervisor.StateShutoff {
				t.Errorf("defined, not started: %+v", st)
			}
			if st.Project != spec.Project || st.Name != spec.Name || st.Epoch != spec.Epoch {
				t.Errorf("metadata: got project %q name %q epoch %d, want %q %q %d", st.Project, st.Name, st.Epoch, spec.Project, spec.Name, spec.Epoch)
			}
		}
	}
	if n != 1 {
		t.Errorf("List has %d entries for %s, want 1", n, spec.VMID)
	}
}

// waitEvent waits for an event of vmID of one of kinds, skipping others.
func waitEvent(t *testing.T, d hypervisor.Driver, vmID string, timeout time.Duration, kinds ...hypervisor.EventKind) hypervisor.Event {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-d.Events():
			if !ok {
				t.Fatalf("events closed while waiting for %v of %s", kinds, vmID)
			}
			if ev.VMID != vmID {
				continue
			}
			for _, k := range kinds {
				if ev.Kind == k {
					return ev
				}
			}
		case <-deadline:
			t.Fatalf("no %v event for %s within %s", kinds, vmID, timeout)
		}
	}
}

// waitConsole waits until marker occurs at least n times in the console log.
// The log is a file the hypervisor appends to; polling it against a
// deadline is the only way to watch it.
func (s *suite) waitConsole(t *testing.T, spec hypervisor.DomainSpec, marker string, n int) {
	t.Helper()
	deadline := time.Now().Add(s.fx.BootTimeout)
	var last []byte
	for time.Now().Before(deadline) {
		b, err := hypervisor.ReadConsoleTail(spec.ConsoleLogPath, 1<<20)
		if err != nil {
			t.Fatalf("ReadConsoleTail: %v", err)
		}
		last = b
		if bytes.Count(b, []byte(marker)) >= n {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	tail := last
	if len(tail) > 2000 {
		tail = tail[len(tail)-2000:]
	}
	t.Fatalf("console of %s: %q did not appear %d times within %s; tail:\n%s", spec.VMID, marker, n, s.fx.BootTimeout, tail)
}

func (s *suite) mustStatus(t *testing.T, d hypervisor.Driver, vmID string) hypervisor.DomainStatus {
	t.Helper()
	st, err := d.Status(ctxFor(t, time.Minute), vmID)
	if err != nil {
		t.Fatalf("Status %s: %v", vmID, err)
	}
	return st
}

func (s *suite) startRuns(t *testing.T) {
	d := s.newDriver(t)
	spec := s.defined(t, d)
	waitEvent(t, d, spec.VMID, time.Minute, hypervisor.EventDefined)
	ctx := ctxFor(t, time.Minute)
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitEvent(t, d, spec.VMID, time.Minute, hypervisor.EventStarted)
	st := s.mustStatus(t, d, spec.VMID)
	if !st.Exists || !st.Running || st.State != hypervisor.StateRunning {
		t.Fatalf("after Start: %+v, want running", st)
	}
	if st.Hypervisor != spec.Hypervisor {
		t.Errorf("Status hypervisor %q, want %q", st.Hypervisor, spec.Hypervisor)
	}
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Errorf("Start of a running domain: %v", err)
	}
	if s.fx.BootMarker != "" {
		s.waitConsole(t, spec, s.fx.BootMarker, 1)
	}
}

func (s *suite) shutdownForced(t *testing.T) {
	d := s.newDriver(t)
	spec := s.defined(t, d)
	ctx := ctxFor(t, 2*time.Minute)
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	// Right after start no guest listens to the power button yet: the
	// press is lost and the deadline must cut power.
	if err := d.Shutdown(ctx, spec.VMID, 300*time.Millisecond); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	st := s.mustStatus(t, d, spec.VMID)
	if st.Running || st.State != hypervisor.StateShutoff {
		t.Fatalf("after Shutdown: %+v, want shutoff", st)
	}
	if s.fx.ReadyMarker != "" && st.Reason != "destroyed" {
		t.Errorf("after a shutdown the guest could not have seen: reason %q, want destroyed", st.Reason)
	}
	if err := d.Shutdown(ctx, spec.VMID, time.Second); err != nil {
		t.Errorf("Shutdown of a stopped domain: %v", err)
	}
}

func (s *suite) shutdownGraceful(t *testing.T) {
	if s.fx.ReadyMarker == "" {
		t.Skip("the fixture guest does not handle ACPI power-off")
	}
	d := s.newDriver(t)
	spec := s.defined(t, d)
	ctx := ctxFor(t, 2*s.fx.BootTimeout)
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	s.waitConsole(t, spec, s.fx.ReadyMarker, 1)
	if err := d.Shutdown(ctx, spec.VMID, s.fx.BootTimeout); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	st := s.mustStatus(t, d, spec.VMID)
	if st.Running || st.State != hypervisor.StateShutoff || st.Reason != "shutdown" {
		t.Fatalf("after graceful Shutdown: %+v, want shutoff/shutdown", st)
	}
	waitEvent(t, d, spec.VMID, time.Minute, hypervisor.EventStopped)
}

func (s *suite) destroyRestart(t *testing.T) {
	d := s.newDriver(t)
	spec := s.defined(t, d)
	ctx := ctxFor(t, 2*time.Minute)
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := d.Destroy(ctx, spec.VMID); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	ev := waitEvent(t, d, spec.VMID, time.Minute, hypervisor.EventStopped)
	if ev.Detail != "destroyed" {
		t.Errorf("stopped event detail %q, want destroyed", ev.Detail)
	}
	st := s.mustStatus(t, d, spec.VMID)
	if !st.Exists || st.Running || st.State != hypervisor.StateShutoff || st.Reason != "destroyed" {
		t.Fatalf("after Destroy: %+v, want defined, shutoff/destroyed", st)
	}
	if err := d.Destroy(ctx, spec.VMID); err != nil {
		t.Errorf("Destroy of a stopped domain: %v", err)
	}
	if err := d.Reboot(ctx, spec.VMID); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Reboot of a stopped domain: %v, want FailedPrecondition", err)
	}
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start after Destroy: %v", err)
	}
	if st := s.mustStatus(t, d, spec.VMID); !st.Running {
		t.Fatalf("after restart: %+v", st)
	}
}

func (s *suite) reboot(t *testing.T) {
	if s.fx.BootMarker == "" {
		t.Skip("no boot marker to count boots with")
	}
	d := s.newDriver(t)
	spec := s.defined(t, d)
	ctx := ctxFor(t, 3*s.fx.BootTimeout)
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	s.waitConsole(t, spec, s.fx.BootMarker, 1)
	if err := d.Reboot(ctx, spec.VMID); err != nil {
		t.Fatalf("Reboot: %v", err)
	}
	s.waitConsole(t, spec, s.fx.BootMarker, 2)
	if st := s.mustStatus(t, d, spec.VMID); !st.Running {
		t.Fatalf("after Reboot: %+v, want running", st)
	}
}

func (s *suite) undefine(t *testing.T) {
	d := s.newDriver(t)
	spec := s.defined(t, d)
	ctx := ctxFor(t, 2*time.Minute)
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := d.Undefine(ctx, spec.VMID); err != nil {
		t.Fatalf("Undefine of a running domain: %v", err)
	}
	waitEvent(t, d, spec.VMID, time.Minute, hypervisor.EventUndefined)
	if st := s.mustStatus(t, d, spec.VMID); st.Exists || st.State != hypervisor.StateAbsent {
		t.Errorf("after Undefine: %+v, want absent", st)
	}
	if s.fx.Observe != nil && s.fx.Observe(t, spec.VMID) {
		t.Errorf("the hypervisor still has a domain for %s after Undefine", spec.VMID)
	}
	list, err := d.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	for _, st := range list {
		if st.VMID == spec.VMID {
			t.Errorf("List still has %+v", st)
		}
	}
	if err := d.Undefine(ctx, spec.VMID); err != nil {
		t.Errorf("second Undefine: %v", err)
	}
}

// HostileNames are VM names and projects that would break hand-built XML.
var HostileNames = []string{
	`web</name><devices><disk type='file' device='disk'><source file='/etc/shadow'/></disk></devices><name>x`,
	`"'&<>]]><!-- -->&amp;&#x41;`,
	"proj\n<metadata/>",
}

func (s *suite) hostileNames(t *testing.T) {
	d := s.newDriver(t)
	ctx := ctxFor(t, time.Minute)
	for i, name := range HostileNames {
		project := HostileNames[(i+1)%len(HostileNames)]
		spec := s.defined(t, d, func(sp *hypervisor.DomainSpec) { sp.Name, sp.Project = name, project })
		st, err := d.Status(ctx, spec.VMID)
		if err != nil {
			t.Fatalf("Status: %v", err)
		}
		if st.Name != name || st.Project != project {
			t.Errorf("hostile name/project did not round-trip:\n got  %q / %q\n want %q / %q", st.Name, st.Project, name, project)
		}
	}
}

func (s *suite) listOnlyTagged(t *testing.T) {
	if s.fx.DefineForeign == nil {
		t.Skip("fixture cannot define foreign domains")
	}
	d := s.newDriver(t)
	ctx := ctxFor(t, time.Minute)
	ours := s.defined(t, d)
	foreignID := uuid.NewString()
	s.fx.DefineForeign(t, hypervisor.DomainName(foreignID)) // looks like ours, is not
	s.fx.DefineForeign(t, "someone-else-"+foreignID[:8])

	list, err := d.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	found := false
	for _, st := range list {
		if st.VMID == foreignID || strings.HasPrefix(st.VMID, "someone-else") {
			t.Errorf("List returned a foreign domain: %+v", st)
		}
		found = found || st.VMID == ours.VMID
	}
	if !found {
		t.Errorf("List misses our domain %s", ours.VMID)
	}
	for name, op := range map[string]func() error{
		"Start":    func() error { return d.Start(ctx, foreignID) },
		"Destroy":  func() error { return d.Destroy(ctx, foreignID) },
		"Undefine": func() error { return d.Undefine(ctx, foreignID) },
		"Define":   func() error { return d.Define(ctx, s.fx.NewSpec(t, foreignID)) },
	} {
		if err := op(); !errdefs.IsConflict(err) {
			t.Errorf("%s on a foreign domain named like ours: %v, want Conflict", name, err)
		}
	}
	if s.fx.Observe != nil && !s.fx.Observe(t, foreignID) {
		t.Errorf("the foreign domain was removed")
	}
}
