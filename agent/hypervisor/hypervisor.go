// Package hypervisor is the agent's port to the thing that runs VMs: the
// types the agent speaks (DomainSpec, DomainStatus, Event) and the Driver
// interface an adapter implements. The libvirt adapter lives in
// agent/hypervisor/libvirt; the behaviour every adapter must show is pinned
// down by the conformance suite in agent/hypervisor/hypervisortest.
//
// A domain belongs to one VM and is named DomainName(vmID). A Driver only
// ever touches domains it created (tagged with minicloud's metadata); others
// on the same host are invisible to List and untouchable through the Driver.
package hypervisor

import (
	"context"
	"io"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/nic"
)

// Hypervisor kinds, as stored on Host.hypervisors and VMStatus.hypervisor.
const (
	KVM = "kvm"
	TCG = "tcg"
)

// DomainNamePrefix starts the name of every domain minicloud creates.
const DomainNamePrefix = "mc-"

// DomainName is the hypervisor-level name of a VM's domain.
func DomainName(vmID string) string { return DomainNamePrefix + vmID }

// SMBIOS is what the guest reads from DMI. cloud-init's OpenStack datasource
// identifies the cloud by Product "OpenStack Nova" (or Manufacturer
// "OpenStack Foundation"); UUID must equal the VM id.
type SMBIOS struct {
	Manufacturer string
	Product      string
	Version      string
	Serial       string
	UUID         string
	Family       string
}

// DomainSpec is the desired shape of one VM's domain. Every path is absolute
// and must be readable by the hypervisor's unprivileged QEMU user.
type DomainSpec struct {
	VMID    string // a UUID; also the domain UUID and SMBIOS UUID
	Name    string // the VM's user-facing name (free text, kept in metadata)
	Project string
	// Epoch is the VM's assignment epoch this domain was made for (kept in
	// metadata): a host that finds a domain of an older epoch holds a copy
	// of a VM that moved since, and must destroy it before starting it.
	Epoch int64

	VCPUs     int
	MemoryMiB int64
	// Hypervisor is KVM or TCG; it must be one of the host's
	// HostCapabilities.Hypervisors.
	Hypervisor string

	DiskPath   string // the VM's own disk (a qcow2 overlay)
	DiskFormat string // "qcow2" (default) or "raw"

	// Direct kernel boot when KernelPath is set; otherwise the disk boots.
	KernelPath string
	InitrdPath string
	Cmdline    string

	// ConfigDrivePath is an ISO attached as a read-only CD-ROM, or "".
	ConfigDrivePath string

	// NICs are attached to tap devices that the network adapter created
	// beforehand (the Driver never creates or deletes taps); an MTU of 0
	// leaves the tap's own.
	NICs []nic.NIC

	// ConsoleLogPath receives the serial console (ttyS0). Its size is
	// bounded: the hypervisor rotates it (see ReadConsoleTail).
	ConsoleLogPath string

	SMBIOS SMBIOS
}

// Validate rejects a spec that cannot become a domain, with a message that
// names the field. It never touches the host.
func (s DomainSpec) Validate() error {
	if _, err := uuid.Parse(s.VMID); err != nil || strings.ToLower(s.VMID) != s.VMID || len(s.VMID) != 36 {
		return errdefs.Invalid("domain spec: vm id %q is not a lower-case UUID", s.VMID)
	}
	if s.VCPUs < 1 {
		return errdefs.Invalid("domain spec %s: vcpus must be at least 1, got %d", s.VMID, s.VCPUs)
	}
	if s.MemoryMiB < 16 {
		return errdefs.Invalid("domain spec %s: memory must be at least 16 MiB, got %d", s.VMID, s.MemoryMiB)
	}
	if s.Hypervisor != KVM && s.Hypervisor != TCG {
		return errdefs.Invalid("domain spec %s: hypervisor must be %q or %q, got %q", s.VMID, KVM, TCG, s.Hypervisor)
	}
	if !absolute(s.DiskPath) {
		return errdefs.Invalid("domain spec %s: disk path %q must be absolute", s.VMID, s.DiskPath)
	}
	switch s.DiskFormat {
	case "", "qcow2", "raw":
	default:
		return errdefs.Invalid("domain spec %s: disk format must be qcow2 or raw, got %q", s.VMID, s.DiskFormat)
	}
	for field, p := range map[string]string{"kernel": s.KernelPath, "initrd": s.InitrdPath, "config drive": s.ConfigDrivePath} {
		if p != "" && !absolute(p) {
			return errdefs.Invalid("domain spec %s: %s path %q must be absolute", s.VMID, field, p)
		}
	}
	if s.KernelPath == "" && (s.InitrdPath != "" || s.Cmdline != "") {
		return errdefs.Invalid("domain spec %s: initrd and cmdline need a kernel", s.VMID)
	}
	if !absolute(s.ConsoleLogPath) {
		return errdefs.Invalid("domain spec %s: console log path %q must be absolute", s.VMID, s.ConsoleLogPath)
	}
	for i, n := range s.NICs {
		if len(n.MAC) != 6 {
			return errdefs.Invalid("domain spec %s: nic %d: mac %q is not a 48-bit MAC", s.VMID, i, n.MAC.String())
		}
		if n.TapName == "" || len(n.TapName) > 15 || strings.ContainsAny(n.TapName, "/ \t\n:") {
			return errdefs.Invalid("domain spec %s: nic %d: tap name %q is not a valid interface name", s.VMID, i, n.TapName)
		}
		if n.MTU < 0 || n.MTU > 65535 {
			return errdefs.Invalid("domain spec %s: nic %d: mtu %d out of range", s.VMID, i, n.MTU)
		}
	}
	if s.SMBIOS.UUID != "" && s.SMBIOS.UUID != s.VMID {
		return errdefs.Invalid("domain spec %s: smbios uuid %q must equal the vm id", s.VMID, s.SMBIOS.UUID)
	}
	return nil
}

func absolute(p string) bool { return strings.HasPrefix(p, "/") && !strings.Contains(p, "\x00") }

// Observed power states of a domain (DomainStatus.State).
const (
	StateAbsent       = "absent" // no such domain
	StateRunning      = "running"
	StateShutoff      = "shutoff" // defined, not running
	StateShuttingDown = "shutting-down"
	StatePaused       = "paused"
	StateCrashed      = "crashed"
	StateSuspended    = "pmsuspended"
	StateUnknown      = "unknown"
)

// DomainStatus is what the hypervisor reports for one VM's domain.
type DomainStatus struct {
	VMID    string
	Project string // from the domain's metadata
	Name    string // the VM name from the domain's metadata
	Epoch   int64  // the assignment epoch from the domain's metadata
	Exists  bool
	// Running is true while the guest has a live process (running, paused,
	// shutting down).
	Running bool
	State   string // one of the State* constants
	// Reason is the hypervisor's reason for State, e.g. "booted",
	// "shutdown", "destroyed", "crashed", "failed".
	Reason     string
	Hypervisor string // KVM or TCG, from the definition
}

// HostCapabilities is what this host can run.
type HostCapabilities struct {
	VCPUs     int
	MemoryMiB int64
	// Hypervisors that actually run guests here, best first (KVM before
	// TCG).
	Hypervisors []string
	// KVMUnusable says why KVM is not in Hypervisors, for the operator.
	KVMUnusable string
}

// EventKind says what happened to a domain.
type EventKind string

const (
	EventDefined   EventKind = "defined"
	EventUndefined EventKind = "undefined"
	EventStarted   EventKind = "started"
	EventSuspended EventKind = "suspended"
	EventResumed   EventKind = "resumed"
	// EventStopped: the guest process ended (shutdown, destroy, crash with
	// on_crash=destroy, failed start); Detail says which.
	EventStopped  EventKind = "stopped"
	EventShutdown EventKind = "shutdown" // the guest began shutting down
	EventCrashed  EventKind = "crashed"
	// EventResync carries no VM: the driver lost events (the hypervisor
	// restarted or the connection broke) and the consumer must re-list.
	EventResync EventKind = "resync"
)

// Event is one lifecycle change of a minicloud domain.
type Event struct {
	VMID   string // empty for EventResync
	Kind   EventKind
	Detail string
	Time   time.Time
}

// Driver runs VMs as hypervisor domains. Every method is idempotent and safe
// for concurrent use on different VMs; the caller serialises operations on
// one VM (the reconcile loop is keyed by VM id). Methods that name a VM fail
// with errdefs.NotFound when its domain does not exist, except Undefine and
// Destroy, which treat "absent" as done.
type Driver interface {
	// Capabilities measures the host.
	Capabilities(ctx context.Context) (HostCapabilities, error)

	// Define creates or updates the persistent domain of spec.VMID. An
	// update of a running domain takes effect at its next start.
	Define(ctx context.Context, spec DomainSpec) error

	// Start boots a defined domain and returns once the hypervisor reports
	// it running. Starting a running domain does nothing.
	Start(ctx context.Context, vmID string) error

	// Shutdown asks the guest to power off (ACPI power button) and waits for
	// it to stop; when timeout passes first, it destroys the domain. A
	// stopped domain is left alone.
	Shutdown(ctx context.Context, vmID string, timeout time.Duration) error

	// Destroy stops the domain at once (power cut). The definition stays.
	Destroy(ctx context.Context, vmID string) error

	// Reboot resets a running guest at once, like a reset button: the guest
	// OS is not asked. A soft reboot is Shutdown followed by Start.
	Reboot(ctx context.Context, vmID string) error

	// Undefine destroys the domain if it runs and removes its definition.
	// Absent domains are not an error. Files (disk, ISO, console log) are the
	// caller's.
	Undefine(ctx context.Context, vmID string) error

	// Status observes one VM's domain; a missing domain is not an error but
	// DomainStatus{Exists: false, State: StateAbsent}.
	Status(ctx context.Context, vmID string) (DomainStatus, error)

	// List returns every domain that carries minicloud's metadata, and no
	// other.
	List(ctx context.Context) ([]DomainStatus, error)

	// OpenConsole connects to the serial console (ttyS0) of a running
	// domain: reads return what the guest writes, writes are the guest's
	// input. Reads end with io.EOF once the domain stops or Close is
	// called. The hypervisor hands out one console connection per domain:
	// while one is open another OpenConsole fails with errdefs.Conflict
	// (sharing it among users is the caller's job). errdefs.NotFound for an
	// absent domain, errdefs.FailedPrecondition for one that is not running.
	// The reader must be drained promptly: an adapter may stall other
	// calls while output waits.
	OpenConsole(ctx context.Context, vmID string) (io.ReadWriteCloser, error)

	// Stats samples a running domain's cumulative counters;
	// errdefs.FailedPrecondition when it is not running.
	Stats(ctx context.Context, vmID string) (DomainStats, error)

	// Events delivers lifecycle events of minicloud's domains, and
	// EventResync whenever events may have been lost. The channel is closed
	// by Close. Events are hints: consumers re-read Status.
	Events() <-chan Event

	// Close releases the connection and closes Events.
	Close() error
}
