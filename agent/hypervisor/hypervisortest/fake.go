package hypervisortest

import (
	"context"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// FakeHost is the in-memory "hypervisor" behind FakeDrivers: the domains
// and what their guests do. Share one between several FakeDrivers to play a
// reconnect or an agent restart; its methods outside the Driver interface
// play what happens on the host behind the driver's back (a guest powering
// off, a crash, someone undefining a domain by hand).
type FakeHost struct {
	mu      sync.Mutex
	domains map[string]*fakeDomain // by domain name
	drivers map[*FakeDriver]bool   // open drivers, to fan events out to
	calls   []Call
	// Capabilities is what Capabilities reports.
	caps hypervisor.HostCapabilities
}

type fakeDomain struct {
	spec    hypervisor.DomainSpec
	foreign bool // not created through a driver: carries no minicloud metadata
	running bool
	state   string
	reason  string
	// handlesACPI: the guest powers off when the ACPI button is pressed.
	handlesACPI bool
	// console is the open console stream, if any (one at a time).
	console *fakeConsole
	// started is when the guest last started; cpuWork what the console
	// made it do (Stats).
	started time.Time
	cpuWork time.Duration
}

// Call is one driver call that changes a domain, as recorded for tests.
type Call struct {
	Op      string // "Define", "Start", "Shutdown", "Destroy", "Reboot", "Undefine"
	VMID    string
	Timeout time.Duration // Shutdown's
}

// NewFakeHost returns a host with no domains that runs TCG guests only.
func NewFakeHost() *FakeHost {
	return &FakeHost{
		domains: map[string]*fakeDomain{},
		drivers: map[*FakeDriver]bool{},
		caps: hypervisor.HostCapabilities{VCPUs: 8, MemoryMiB: 16384, Hypervisors: []string{hypervisor.TCG},
			KVMUnusable: "fake host: no /dev/kvm"},
	}
}

// FakeDriver is an in-memory hypervisor.Driver for unit tests of the
// reconcile loop, which cannot make real domains without root. It passes
// RunConformance; it runs no guest and writes no console log, but its
// console plays a shell that answers echo (fakeconsole.go).
type FakeDriver struct {
	host *FakeHost

	mu     sync.Mutex
	events chan hypervisor.Event
	lost   bool // an event was dropped: send EventResync next
	closed bool
}

var _ hypervisor.Driver = (*FakeDriver)(nil)

// NewFakeDriver returns a driver over host.
func NewFakeDriver(host *FakeHost) *FakeDriver {
	d := &FakeDriver{host: host, events: make(chan hypervisor.Event, 256)}
	host.mu.Lock()
	host.drivers[d] = true
	host.mu.Unlock()
	return d
}

// emit sends an event to every open driver, never blocking: a driver whose
// buffer is full sends EventResync once it has room again, as the contract
// asks of a driver that lost events. Called with h.mu held.
func (h *FakeHost) emit(vmID string, kind hypervisor.EventKind, detail string) {
	ev := hypervisor.Event{VMID: vmID, Kind: kind, Detail: detail, Time: time.Now()}
	for d := range h.drivers {
		d.send(ev)
	}
}

func (d *FakeDriver) send(ev hypervisor.Event) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	if d.lost {
		select {
		case d.events <- hypervisor.Event{Kind: hypervisor.EventResync, Time: ev.Time}:
			d.lost = false
		default:
			return
		}
	}
	select {
	case d.events <- ev:
	default:
		d.lost = true
	}
}

// Events implements hypervisor.Driver.
func (d *FakeDriver) Events() <-chan hypervisor.Event { return d.events }

// Close implements hypervisor.Driver.
func (d *FakeDriver) Close() error {
	d.host.mu.Lock()
	delete(d.host.drivers, d)
	d.host.mu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		d.closed = true
		close(d.events)
	}
	return nil
}

// Capabilities implements hypervisor.Driver.
func (d *FakeDriver) Capabilities(context.Context) (hypervisor.HostCapabilities, error) {
	d.host.mu.Lock()
	defer d.host.mu.Unlock()
	c := d.host.caps
	c.Hypervisors = append([]string(nil), c.Hypervisors...)
	return c, nil
}

// lookup returns vmID's domain: NotFound when absent, Conflict when the name
// is taken by a domain minicloud did not create. Called with h.mu held.
func (h *FakeHost) lookup(vmID string) (*fakeDomain, error) {
	dom, ok := h.domains[hypervisor.DomainName(vmID)]
	if !ok {
		return nil, errdefs.NotFound("no domain for vm %s", vmID)
	}
	if dom.foreign {
		return nil, errdefs.Conflict("domain %s exists but was not created by minicloud", hypervisor.DomainName(vmID))
	}
	return dom, nil
}

func (h *FakeHost) record(c Call) { h.calls = append(h.calls, c) }

// act looks up vmID's domain for a call that needs it, and records the call.
// Called with h.mu held.
func (h *FakeHost) act(op, vmID string) (*fakeDomain, error) {
	dom, err := h.lookup(vmID)
	if err == nil {
		h.record(Call{Op: op, VMID: vmID})
	}
	return dom, err
}

// Define implements hypervisor.Driver.
func (d *FakeDriver) Define(_ context.Context, spec hypervisor.DomainSpec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	if spec.Hypervisor == hypervisor.KVM && !contains(h.caps.Hypervisors, hypervisor.KVM) {
		return errdefs.FailedPrecondition("define %s: KVM cannot run guests on this host: %s", spec.VMID, h.caps.KVMUnusable)
	}
	h.record(Call{Op: "Define", VMID: spec.VMID})
	spec.NICs = append(spec.NICs[:0:0], spec.NICs...)
	dom, err := h.lookup(spec.VMID)
	switch {
	case errdefs.IsNotFound(err):
		h.domains[hypervisor.DomainName(spec.VMID)] = &fakeDomain{spec: spec, state: hypervisor.StateShutoff, reason: "unknown"}
	case err != nil:
		return err
	default:
		dom.spec = spec // takes effect at the next start, as with libvirt
	}
	h.emit(spec.VMID, hypervisor.EventDefined, "added")
	return nil
}

// Start implements hypervisor.Driver.
func (d *FakeDriver) Start(_ context.Context, vmID string) error {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err := h.act("Start", vmID)
	if err != nil {
		return err
	}
	if dom.running {
		return nil
	}
	dom.running, dom.state, dom.reason = true, hypervisor.StateRunning, "booted"
	dom.started, dom.cpuWork = time.Now(), 0
	h.emit(vmID, hypervisor.EventStarted, "booted")
	return nil
}

// Shutdown implements hypervisor.Driver: a guest that handles ACPI (see
// SetHandlesACPI) powers off at once; any other is destroyed when timeout
// passes.
func (d *FakeDriver) Shutdown(ctx context.Context, vmID string, timeout time.Duration) error {
	h := d.host
	h.mu.Lock()
	dom, err := h.lookup(vmID)
	if err != nil {
		h.mu.Unlock()
		return err
	}
	h.record(Call{Op: "Shutdown", VMID: vmID, Timeout: timeout})
	if !dom.running {
		h.mu.Unlock()
		return nil
	}
	if dom.handlesACPI {
		h.stop(vmID, dom, hypervisor.StateShutoff, "shutdown")
		h.mu.Unlock()
		return nil
	}
	h.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return errdefs.Wrap(errdefs.KindUnavailable, ctx.Err(), "shut down %s", vmID)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err = h.lookup(vmID)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if dom.running {
		h.stop(vmID, dom, hypervisor.StateShutoff, "destroyed")
	}
	return nil
}

// stop ends the guest process. Called with h.mu held.
func (h *FakeHost) stop(vmID string, dom *fakeDomain, state, reason string) {
	dom.running, dom.state, dom.reason = false, state, reason
	if dom.console != nil {
		dom.console.release()
	}
	h.emit(vmID, hypervisor.EventStopped, reason)
}

// Destroy implements hypervisor.Driver.
func (d *FakeDriver) Destroy(_ context.Context, vmID string) error {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := h.powerOff("Destroy", vmID)
	return err
}

// powerOff cuts the power of vmID's domain for Destroy and Undefine, which
// treat an absent domain as done (nil, nil). Called with h.mu held.
func (h *FakeHost) powerOff(op, vmID string) (*fakeDomain, error) {
	dom, err := h.lookup(vmID)
	if errdefs.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	h.record(Call{Op: op, VMID: vmID})
	if dom.running {
		h.stop(vmID, dom, hypervisor.StateShutoff, "destroyed")
	}
	return dom, nil
}

// Reboot implements hypervisor.Driver.
func (d *FakeDriver) Reboot(_ context.Context, vmID string) error {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err := h.act("Reboot", vmID)
	if err != nil {
		return err
	}
	if !dom.running {
		return errdefs.FailedPrecondition("reset %s: domain is not running", vmID)
	}
	dom.reason = "booted"
	return nil
}

// Undefine implements hypervisor.Driver.
func (d *FakeDriver) Undefine(_ context.Context, vmID string) error {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err := h.powerOff("Undefine", vmID)
	if dom == nil || err != nil {
		return err
	}
	delete(h.domains, hypervisor.DomainName(vmID))
	h.emit(vmID, hypervisor.EventUndefined, "removed")
	return nil
}

// Status implements hypervisor.Driver.
func (d *FakeDriver) Status(_ context.Context, vmID string) (hypervisor.DomainStatus, error) {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err := h.lookup(vmID)
	if errdefs.IsNotFound(err) {
		return hypervisor.DomainStatus{VMID: vmID, State: hypervisor.StateAbsent}, nil
	}
	if err != nil {
		return hypervisor.DomainStatus{VMID: vmID}, err
	}
	return dom.status(), nil
}

func (dom *fakeDomain) status() hypervisor.DomainStatus {
	return hypervisor.DomainStatus{
		VMID: dom.spec.VMID, Project: dom.spec.Project, Name: dom.spec.Name, Epoch: dom.spec.Epoch,
		Exists: true, Running: dom.running, State: dom.state, Reason: dom.reason,
		Hypervisor: dom.spec.Hypervisor,
	}
}

// List implements hypervisor.Driver.
func (d *FakeDriver) List(context.Context) ([]hypervisor.DomainStatus, error) {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []hypervisor.DomainStatus
	for _, dom := range h.domains {
		if !dom.foreign {
			out = append(out, dom.status())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VMID < out[j].VMID })
	return out, nil
}

// The methods below play the host and the guests, outside the driver.

// DefineForeign adds a domain named name that minicloud did not create.
func (h *FakeHost) DefineForeign(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.domains[name] = &fakeDomain{foreign: true, state: hypervisor.StateShutoff, reason: "unknown",
		spec: hypervisor.DomainSpec{VMID: strings.TrimPrefix(name, hypervisor.DomainNamePrefix)}}
}

// RemoveDomain removes the domain named name as an operator with virsh
// would: without an event the driver could tell apart from its own.
func (h *FakeHost) RemoveDomain(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if dom, ok := h.domains[name]; ok {
		delete(h.domains, name)
		if !dom.foreign {
			h.emit(dom.spec.VMID, hypervisor.EventUndefined, "removed")
		}
	}
}

// HasDomain reports whether any domain (minicloud's or not) is named name.
func (h *FakeHost) HasDomain(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.domains[name]
	return ok
}

// SetHandlesACPI says whether the guest of vmID powers off when asked.
func (h *FakeHost) SetHandlesACPI(vmID string, handles bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if dom, ok := h.domains[hypervisor.DomainName(vmID)]; ok {
		dom.handlesACPI = handles
	}
}

// GuestPowerOff plays the guest of vmID shutting itself down.
func (h *FakeHost) GuestPowerOff(vmID string) {
	h.guestStop(vmID, hypervisor.StateShutoff, "shutdown")
}

// GuestCrash plays the guest of vmID crashing (on_crash=destroy: the
// domain stays defined, shut off with reason "crashed").
func (h *FakeHost) GuestCrash(vmID string) {
	h.guestStop(vmID, hypervisor.StateShutoff, "crashed")
}

// QEMUGone plays the domain's QEMU going away with its libvirtd (the host
// rebooted, or every process of it was killed): shut off, reason unknown.
func (h *FakeHost) QEMUGone(vmID string) {
	h.guestStop(vmID, hypervisor.StateShutoff, "unknown")
}

func (h *FakeHost) guestStop(vmID, state, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if dom, ok := h.domains[hypervisor.DomainName(vmID)]; ok && dom.running {
		h.stop(vmID, dom, state, reason)
		if reason == "crashed" {
			h.emit(vmID, hypervisor.EventCrashed, reason)
		}
	}
}

// Spec returns the last spec defined for vmID.
func (h *FakeHost) Spec(vmID string) (hypervisor.DomainSpec, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, ok := h.domains[hypervisor.DomainName(vmID)]
	if !ok || dom.foreign {
		return hypervisor.DomainSpec{}, false
	}
	return dom.spec, true
}

// Calls returns the recorded calls that changed (or tried to change) vmID's
// domain, in order.
func (h *FakeHost) Calls(vmID string) []Call {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []Call
	for _, c := range h.calls {
		if c.VMID == vmID {
			out = append(out, c)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
