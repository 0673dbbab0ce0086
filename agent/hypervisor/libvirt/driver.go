// Package libvirt is the hypervisor.Driver that runs minicloud VMs as
// libvirt/QEMU domains, talking to libvirtd over its unix socket
// (qemu:///system) with github.com/digitalocean/go-libvirt and building
// domain XML only with libvirt.org/go/libvirtxml.
package libvirt

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// acpiRepressInterval is how often Shutdown presses the power button again.
const acpiRepressInterval = 10 * time.Second

// DefaultSocket is libvirtd's read-write socket for qemu:///system.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// Options configure a Driver.
type Options struct {
	// Socket is libvirtd's unix socket; DefaultSocket when empty.
	Socket string
	// KVMProbeTimeout bounds the KVM probe (ProbeKVM); 2 s when zero.
	KVMProbeTimeout time.Duration
	// DisableKVM skips the probe and offers TCG only.
	DisableKVM bool
	Logger     *slog.Logger
}

// Driver implements hypervisor.Driver with libvirt.
type Driver struct {
	c   *conn
	log *slog.Logger

	kvmOnce   sync.Once
	kvmErr    error // nil: KVM runs guests here
	kvmProbeT time.Duration
	noKVM     bool

	// statusReads counts the Status calls that asked libvirtd (tests).
	statusReads atomic.Int64
}

var _ hypervisor.Driver = (*Driver)(nil)

// New starts a Driver. It returns at once; the connection to libvirtd is made
// (and remade after libvirtd restarts) in the background, and calls wait for
// it until their context ends.
func New(opts Options) *Driver {
	if opts.Socket == "" {
		opts.Socket = DefaultSocket
	}
	if opts.KVMProbeTimeout == 0 {
		opts.KVMProbeTimeout = 2 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger.With("component", "hypervisor/libvirt")
	return &Driver{c: newConn(opts.Socket, log), log: log, kvmProbeT: opts.KVMProbeTimeout, noKVM: opts.DisableKVM}
}

// Close implements hypervisor.Driver.
func (d *Driver) Close() error {
	d.c.close()
	return nil
}

// Events implements hypervisor.Driver.
func (d *Driver) Events() <-chan hypervisor.Event { return d.c.events }

// Capabilities implements hypervisor.Driver. vCPUs come from libvirt; memory
// from /proc/meminfo, because libvirt's NodeGetInfo under-reports inside
// containers/nested guests; KVM is offered only when ProbeKVM succeeds.
func (d *Driver) Capabilities(ctx context.Context) (hypervisor.HostCapabilities, error) {
	l, err := d.c.get(ctx)
	if err != nil {
		return hypervisor.HostCapabilities{}, err
	}
	_, _, cpus, _, _, _, _, _, err := l.NodeGetInfo()
	if err != nil {
		return hypervisor.HostCapabilities{}, classify(err, "node info")
	}
	mem, err := memTotalMiB()
	if err != nil {
		return hypervisor.HostCapabilities{}, err
	}
	caps := hypervisor.HostCapabilities{VCPUs: int(cpus), MemoryMiB: mem}
	if err := d.kvmUsable(); err != nil {
		caps.KVMUnusable = err.Error()
	} else {
		caps.Hypervisors = append(caps.Hypervisors, hypervisor.KVM)
	}
	caps.Hypervisors = append(caps.Hypervisors, hypervisor.TCG)
	return caps, nil
}

func (d *Driver) kvmUsable() error {
	d.kvmOnce.Do(func() {
		if d.noKVM {
			d.kvmErr = errors.New("disabled by configuration")
			return
		}
		d.kvmErr = ProbeKVM(d.kvmProbeT)
		if d.kvmErr != nil {
			d.log.Info("KVM cannot run guests here; offering TCG only", "reason", d.kvmErr)
		}
	})
	return d.kvmErr
}

func memTotalMiB() (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("read host memory: %w", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kib, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse MemTotal %q: %w", fields[1], err)
			}
			return kib / 1024, nil
		}
	}
	return 0, errors.New("read host memory: no MemTotal in /proc/meminfo")
}

// Define implements hypervisor.Driver.
func (d *Driver) Define(ctx context.Context, spec hypervisor.DomainSpec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if spec.Hypervisor == hypervisor.KVM {
		if err := d.kvmUsable(); err != nil {
			return errdefs.FailedPrecondition("define %s: KVM cannot run guests on this host: %v", spec.VMID, err)
		}
	}
	x, err := DomainXML(spec)
	if err != nil {
		return err
	}
	l, err := d.c.get(ctx)
	if err != nil {
		return err
	}
	// A domain of that name that is not ours must not be overwritten.
	if dom, err := l.DomainLookupByName(hypervisor.DomainName(spec.VMID)); err == nil {
		if _, err := d.ownership(l, dom, spec.VMID); err != nil {
			return err
		}
	} else if !golibvirt.IsNotFound(err) {
		return classify(err, "look up domain of %s", spec.VMID)
	}
	// No DomainDefineValidate: libvirt would load and check its RNG schema
	// on every define, 11-22 ms of a create's critical path on this host
	// (hack/agentbench), for XML that libvirtxml renders from typed
	// structs. The schema check runs on every shape DomainXML renders in
	// TestDomainXMLPassesLibvirtSchema instead; libvirt's own parse still
	// rejects a domain it cannot run.
	defer d.c.statuses.invalidate(spec.VMID)
	if _, err := l.DomainDefineXMLFlags(x, 0); err != nil {
		return classify(err, "define domain of %s", spec.VMID)
	}
	return nil
}

// lookup finds the domain of vmID and checks that it is minicloud's.
func (d *Driver) lookup(ctx context.Context, vmID string) (*golibvirt.Libvirt, golibvirt.Domain, instanceMetadata, error) {
	l, err := d.c.get(ctx)
	if err != nil {
		return nil, golibvirt.Domain{}, instanceMetadata{}, err
	}
	dom, err := l.DomainLookupByName(hypervisor.DomainName(vmID))
	if err != nil {
		return l, dom, instanceMetadata{}, classify(err, "look up domain of %s", vmID)
	}
	md, err := d.ownership(l, dom, vmID)
	return l, dom, md, err
}

// ownership reads minicloud's metadata from dom and refuses domains that
// carry none or another VM's (someone else's domain happens to have our
// naming pattern).
func (d *Driver) ownership(l *golibvirt.Libvirt, dom golibvirt.Domain, vmID string) (instanceMetadata, error) {
	raw, err := l.DomainGetMetadata(dom, int32(golibvirt.DomainMetadataElement), golibvirt.OptString{MetadataNamespace}, 0)
	if err != nil {
		var lerr golibvirt.Error
		if errors.As(err, &lerr) && lerr.Code == uint32(golibvirt.ErrNoDomainMetadata) {
			return instanceMetadata{}, errdefs.Conflict("domain %s exists but was not created by minicloud", dom.Name)
		}
		return instanceMetadata{}, classify(err, "read metadata of %s", dom.Name)
	}
	md, err := parseMetadata(raw)
	if err != nil {
		return md, errdefs.Wrap(errdefs.KindConflict, err, "domain %s", dom.Name)
	}
	if md.VMID != vmID || uuidString(dom.UUID) != vmID {
		return md, errdefs.Conflict("domain %s belongs to vm %q (uuid %s), not %s", dom.Name, md.VMID, uuidString(dom.UUID), vmID)
	}
	return md, nil
}

// Start implements hypervisor.Driver.
func (d *Driver) Start(ctx context.Context, vmID string) error {
	defer d.c.statuses.invalidate(vmID)
	l, dom, _, err := d.lookup(ctx, vmID)
	if err != nil {
		return err
	}
	state, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		return classify(err, "state of %s", vmID)
	}
	switch golibvirt.DomainState(state) {
	case golibvirt.DomainRunning, golibvirt.DomainBlocked:
		return nil
	case golibvirt.DomainPaused:
		if err := l.DomainResume(dom); err != nil {
			return classify(err, "resume %s", vmID)
		}
		return nil
	}
	// DomainCreate returns once QEMU runs the guest (libvirt waits for the
	// process and QMP), so no event wait is needed here.
	if err := l.DomainCreate(dom); err != nil {
		if isOperationInvalid(err) {
			// Lost a race with another start: fine if it runs now.
			if st, _, serr := l.DomainGetState(dom, 0); serr == nil && golibvirt.DomainState(st) == golibvirt.DomainRunning {
				return nil
			}
		}
		return classify(err, "start %s", vmID)
	}
	return nil
}

// Shutdown implements hypervisor.Driver. It waits on lifecycle events (with
// a state re-check after each one and after reconnects), never on sleeps.
func (d *Driver) Shutdown(ctx context.Context, vmID string, timeout time.Duration) error {
	defer d.c.statuses.invalidate(vmID)
	wake, unwatch := d.c.watch(vmID)
	defer unwatch()
	l, dom, _, err := d.lookup(ctx, vmID)
	if err != nil {
		return err
	}
	if active, err := l.DomainIsActive(dom); err != nil {
		return classify(err, "state of %s", vmID)
	} else if active == 0 {
		return nil
	}
	if err := l.DomainShutdownFlags(dom, golibvirt.DomainShutdownAcpiPowerBtn); err != nil && !isOperationInvalid(err) {
		return classify(err, "ask %s to shut down", vmID)
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	// A press that arrives while the guest is still booting (before its
	// ACPI daemon listens) is lost; press again now and then, as Nova does.
	repress := time.NewTicker(acpiRepressInterval)
	defer repress.Stop()
	for {
		select {
		case <-wake:
		case <-repress.C:
			if l, dom, _, err := d.lookup(ctx, vmID); err == nil {
				if err := l.DomainShutdownFlags(dom, golibvirt.DomainShutdownAcpiPowerBtn); err != nil && !isOperationInvalid(err) {
					d.log.Debug("repeat ACPI shutdown", "vm", vmID, "err", err)
				}
			}
			continue
		case <-deadline.C:
			d.log.Info("guest ignored ACPI shutdown; destroying", "vm", vmID, "timeout", timeout)
			return d.Destroy(ctx, vmID)
		case <-ctx.Done():
			return errdefs.Wrap(errdefs.KindUnavailable, ctx.Err(), "shut down %s", vmID)
		}
		// The connection may have been replaced while we waited.
		l, dom, _, err = d.lookup(ctx, vmID)
		if errdefs.IsNotFound(err) {
			return nil // transient domain gone, or undefined meanwhile
		}
		if err != nil {
			return err
		}
		active, err := l.DomainIsActive(dom)
		if err != nil {
			return classify(err, "state of %s", vmID)
		}
		if active == 0 {
			return nil
		}
	}
}

// Destroy implements hypervisor.Driver.
func (d *Driver) Destroy(ctx context.Context, vmID string) error {
	defer d.c.statuses.invalidate(vmID)
	l, dom, _, err := d.lookup(ctx, vmID)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return destroyLive(l, dom, vmID)
}

// destroyLive cuts the power of dom; one that is not running (or vanished
// meanwhile) is fine.
func destroyLive(l *golibvirt.Libvirt, dom golibvirt.Domain, vmID string) error {
	err := l.DomainDestroyFlags(dom, 0)
	switch {
	case err == nil, golibvirt.IsNotFound(err):
		return nil
	case isOperationInvalid(err):
		// "not running" is success only if it is true: right after a
		// libvirtd restart, before it has reattached to a QEMU process,
		// the answer can be wrong, and the caller must retry then.
		if active, aerr := l.DomainIsActive(dom); aerr == nil && active == 0 {
			return nil
		}
	}
	return classify(err, "destroy %s", vmID)
}

// Reboot implements hypervisor.Driver.
func (d *Driver) Reboot(ctx context.Context, vmID string) error {
	defer d.c.statuses.invalidate(vmID)
	l, dom, _, err := d.lookup(ctx, vmID)
	if err != nil {
		return err
	}
	if err := l.DomainReset(dom, 0); err != nil {
		return classify(err, "reset %s", vmID)
	}
	return nil
}

// Undefine implements hypervisor.Driver.
func (d *Driver) Undefine(ctx context.Context, vmID string) error {
	defer d.c.statuses.invalidate(vmID)
	l, dom, _, err := d.lookup(ctx, vmID)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := destroyLive(l, dom, vmID); err != nil {
		return err
	}
	err = l.DomainUndefineFlags(dom, golibvirt.DomainUndefineManagedSave|golibvirt.DomainUndefineSnapshotsMetadata|golibvirt.DomainUndefineCheckpointsMetadata)
	if err != nil && !golibvirt.IsNotFound(err) {
		return classify(err, "undefine %s", vmID)
	}
	return nil
}

// Status implements hypervisor.Driver. A status read before is returned
// until libvirt reports a change of the domain (statuscache.go).
func (d *Driver) Status(ctx context.Context, vmID string) (hypervisor.DomainStatus, error) {
	if st, ok := d.c.statuses.get(vmID); ok {
		return st, nil
	}
	ticket := d.c.statuses.ticket()
	d.statusReads.Add(1)
	l, dom, md, err := d.lookup(ctx, vmID)
	if errdefs.IsNotFound(err) {
		return hypervisor.DomainStatus{VMID: vmID, State: hypervisor.StateAbsent}, nil
	}
	if err != nil {
		return hypervisor.DomainStatus{VMID: vmID}, err
	}
	st, err := d.status(l, dom, md)
	if err == nil {
		d.c.statuses.put(vmID, ticket, st)
	}
	return st, err
}

func (d *Driver) status(l *golibvirt.Libvirt, dom golibvirt.Domain, md instanceMetadata) (hypervisor.DomainStatus, error) {
	st := hypervisor.DomainStatus{VMID: md.VMID, Project: md.Project, Name: md.Name, Epoch: md.Epoch, Hypervisor: md.Hypervisor, Exists: true}
	state, reason, err := l.DomainGetState(dom, 0)
	if golibvirt.IsNotFound(err) {
		return hypervisor.DomainStatus{VMID: md.VMID, State: hypervisor.StateAbsent}, nil
	}
	if err != nil {
		return st, classify(err, "state of %s", md.VMID)
	}
	st.State, st.Reason = translateState(golibvirt.DomainState(state), reason)
	switch st.State {
	case hypervisor.StateRunning, hypervisor.StatePaused, hypervisor.StateShuttingDown, hypervisor.StateSuspended:
		st.Running = true
	}
	return st, nil
}

// List implements hypervisor.Driver.
func (d *Driver) List(ctx context.Context) ([]hypervisor.DomainStatus, error) {
	l, err := d.c.get(ctx)
	if err != nil {
		return nil, err
	}
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, classify(err, "list domains")
	}
	out := make([]hypervisor.DomainStatus, 0, len(doms))
	for _, dom := range doms {
		raw, err := l.DomainGetMetadata(dom, int32(golibvirt.DomainMetadataElement), golibvirt.OptString{MetadataNamespace}, 0)
		if err != nil {
			var lerr golibvirt.Error
			if golibvirt.IsNotFound(err) || (errors.As(err, &lerr) && lerr.Code == uint32(golibvirt.ErrNoDomainMetadata)) {
				continue // gone meanwhile, or not ours
			}
			return nil, classify(err, "read metadata of %s", dom.Name)
		}
		md, err := parseMetadata(raw)
		if err != nil || md.VMID == "" {
			d.log.Warn("domain has unreadable minicloud metadata; ignoring", "domain", dom.Name, "err", err)
			continue
		}
		st, err := d.status(l, dom, md)
		if err != nil {
			return nil, err
		}
		if st.Exists {
			out = append(out, st)
		}
	}
	return out, nil
}

func translateState(s golibvirt.DomainState, reason int32) (string, string) {
	switch s {
	case golibvirt.DomainRunning, golibvirt.DomainBlocked:
		return hypervisor.StateRunning, pick(reason, "unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused", "migration-canceled", "save-canceled", "wakeup", "crashed", "postcopy", "postcopy-failed")
	case golibvirt.DomainPaused:
		return hypervisor.StatePaused, pick(reason, "unknown", "user", "migration", "save", "dump", "ioerror", "watchdog", "from-snapshot", "shutting-down", "snapshot", "crashed", "starting-up", "postcopy", "postcopy-failed", "api-error")
	case golibvirt.DomainShutdown:
		return hypervisor.StateShuttingDown, pick(reason, "unknown", "user")
	case golibvirt.DomainShutoff:
		return hypervisor.StateShutoff, pick(reason, "unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot", "daemon")
	case golibvirt.DomainCrashed:
		return hypervisor.StateCrashed, pick(reason, "unknown", "panicked")
	case golibvirt.DomainPmsuspended:
		return hypervisor.StateSuspended, "pmsuspended"
	}
	return hypervisor.StateUnknown, fmt.Sprintf("state-%d", s)
}

func uuidString(u golibvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

func isOperationInvalid(err error) bool {
	var lerr golibvirt.Error
	return errors.As(err, &lerr) && lerr.Code == uint32(golibvirt.ErrOperationInvalid)
}

// classify wraps a go-libvirt error with the errdefs kind that tells the
// caller what to do: NotFound, FailedPrecondition (wrong state), Invalid (a
// definition libvirt rejects), Unavailable (libvirtd unreachable: retry).
func classify(err error, format string, args ...any) error {
	var lerr golibvirt.Error
	if !errors.As(err, &lerr) {
		// Not an answer from libvirtd: the socket broke.
		return errdefs.Wrap(errdefs.KindUnavailable, err, format, args...)
	}
	switch golibvirt.ErrorNumber(lerr.Code) {
	case golibvirt.ErrNoDomain:
		return errdefs.Wrap(errdefs.KindNotFound, err, format, args...)
	case golibvirt.ErrOperationInvalid:
		return errdefs.Wrap(errdefs.KindFailedPrecondition, err, format, args...)
	case golibvirt.ErrXMLError, golibvirt.ErrXMLDetail, golibvirt.ErrXMLInvalidSchema, golibvirt.ErrInvalidArg, golibvirt.ErrConfigUnsupported:
		return errdefs.Wrap(errdefs.KindInvalidArgument, err, format, args...)
	case golibvirt.ErrDomExist:
		return errdefs.Wrap(errdefs.KindConflict, err, format, args...)
	case golibvirt.ErrNoConnect, golibvirt.ErrRPC, golibvirt.ErrInvalidConn:
		return errdefs.Wrap(errdefs.KindUnavailable, err, format, args...)
	}
	return errdefs.Wrap(errdefs.KindInternal, err, format, args...)
}
