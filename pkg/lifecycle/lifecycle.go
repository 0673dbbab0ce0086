// Package lifecycle is the VM lifecycle in one place: the phases, which
// component may move a VM from one phase to another (the transition table),
// the condition types, reasons and event kinds written to VM statuses and
// event logs, and the rules for the status fields a host owns.
//
// The API, the scheduler and the agent all write VM statuses; they agree on
// what a phase means only through this package. docs/architecture.md shows
// the same table (TestDocTable keeps the two equal).
package lifecycle

import (
	"fmt"
	"strings"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// Phase is a VM's lifecycle phase (VMStatus.phase).
type Phase = minicloudv1.VMPhase

// The phases. None is no VM at all: the phase before a create and after the
// VM is removed for good.
const (
	None      Phase = minicloudv1.VMPhase_VM_PHASE_UNSPECIFIED
	Pending   Phase = minicloudv1.VMPhase_VM_PHASE_PENDING
	Scheduled Phase = minicloudv1.VMPhase_VM_PHASE_SCHEDULED
	Creating  Phase = minicloudv1.VMPhase_VM_PHASE_CREATING
	Running   Phase = minicloudv1.VMPhase_VM_PHASE_RUNNING
	Stopped   Phase = minicloudv1.VMPhase_VM_PHASE_STOPPED
	Error     Phase = minicloudv1.VMPhase_VM_PHASE_ERROR
	Deleting  Phase = minicloudv1.VMPhase_VM_PHASE_DELETING
)

// Phases lists every phase of the proto enum, None first.
var Phases = []Phase{None, Pending, Scheduled, Creating, Running, Stopped, Error, Deleting}

// PhaseName is the phase as people read it: PENDING, RUNNING, ... ("none"
// for None).
func PhaseName(p Phase) string {
	if p == None {
		return "none"
	}
	return strings.TrimPrefix(p.String(), "VM_PHASE_")
}

// Actor is a component that writes VM statuses.
type Actor int

const (
	// API is the API server acting on a user's request, or on a host's
	// request it carries out itself (reschedule, removal).
	API Actor = iota + 1
	// Scheduler is a scheduler replica.
	Scheduler
	// Agent is the VM's host, reporting through ReportVMStatus.
	Agent
)

func (a Actor) String() string {
	switch a {
	case API:
		return "api"
	case Scheduler:
		return "scheduler"
	case Agent:
		return "agent"
	}
	return fmt.Sprintf("actor(%d)", int(a))
}

// Actors lists every actor.
var Actors = []Actor{API, Scheduler, Agent}

// Transition is one row of the table: By may move a VM from From to To
// (From == To: may write the status without changing the phase).
type Transition struct {
	From, To Phase
	By       Actor
	// Why says when it happens.
	Why string
}

// Transitions is the lifecycle. Anything not listed is refused.
//
// A host reports only what it observes (CREATING, RUNNING, STOPPED, ERROR);
// PENDING, SCHEDULED and DELETING are decisions of the scheduler and the API.
// A host that cannot create a VM asks the API to reschedule it, and the API
// sets PENDING — only for a VM whose domain never ran, whose disk nobody can
// care about yet. Removal (to None) happens without a host only for a VM
// that no host holds; otherwise the host confirms it removed everything.
var Transitions = []Transition{
	{None, Pending, API, "CreateVM"},

	{Pending, Scheduled, Scheduler, "placed on a host (capacity claimed)"},
	{Pending, Error, Scheduler, "no valid host, too many attempts, server group gone"},

	{Scheduled, Scheduled, Scheduler, "host_down set or cleared"},
	{Creating, Creating, Scheduler, "host_down set or cleared"},
	{Running, Running, Scheduler, "host_down set or cleared"},
	{Stopped, Stopped, Scheduler, "host_down set or cleared"},
	{Error, Error, Scheduler, "host_down set or cleared"},
	{Deleting, Deleting, Scheduler, "host_down set or cleared"},

	{Scheduled, Creating, Agent, "the host starts creating the VM"},
	{Scheduled, Error, Agent, "the host cannot create the VM (permanent error)"},
	{Scheduled, Running, Agent, "domain started soon enough that CREATING came with it"},
	{Scheduled, Stopped, Agent, "created with power state stopped, CREATING with it"},
	{Creating, Creating, Agent, "conditions while creating"},
	{Creating, Running, Agent, "domain started"},
	{Creating, Stopped, Agent, "created with power state stopped"},
	{Creating, Error, Agent, "permanent error (image unusable, flavor too small, ...)"},
	{Running, Running, Agent, "conditions, reboot observed"},
	{Running, Stopped, Agent, "stopped by request, by the guest, or crashed"},
	{Running, Error, Agent, "domain missing, permanent error"},
	{Stopped, Stopped, Agent, "conditions while stopped"},
	{Stopped, Running, Agent, "started by request"},
	{Stopped, Error, Agent, "domain missing, permanent error"},
	{Error, Error, Agent, "still failing"},
	{Error, Running, Agent, "started again after a new spec write"},
	{Error, Stopped, Agent, "stopped after a new spec write"},
	{Deleting, None, Agent, "the host removed domain, disk and ports (deleted=true)"},

	{Scheduled, Pending, API, "the host gave the VM back (reschedule=true)"},
	{Creating, Pending, API, "the host gave the VM back (reschedule=true)"},
	{Error, Pending, API, "the host gave the VM back (reschedule=true)"},
	{Scheduled, Deleting, API, "DeleteVM of a VM a host holds"},
	{Creating, Deleting, API, "DeleteVM of a VM a host holds"},
	{Running, Deleting, API, "DeleteVM of a VM a host holds"},
	{Stopped, Deleting, API, "DeleteVM of a VM a host holds"},
	{Error, Deleting, API, "DeleteVM of a VM a host holds"},
	{Deleting, Deleting, API, "DeleteVM again while the host cleans up"},
	{Pending, None, API, "DeleteVM of a VM no host holds"},
	{Error, None, API, "DeleteVM of a VM no host holds"},

	// Host failure (docs/operations.md, "When a host dies"): only for a
	// VM whose host is FENCED, proved to run none of its VMs.
	{Running, Pending, API, "EvacuateHost: rebuilt elsewhere from its image"},
	{Stopped, Pending, API, "EvacuateHost: rebuilt elsewhere from its image"},
	{Scheduled, Pending, Scheduler, "automatic evacuation (on_host_failure=EVACUATE)"},
	{Creating, Pending, Scheduler, "automatic evacuation (on_host_failure=EVACUATE)"},
	{Running, Pending, Scheduler, "automatic evacuation (on_host_failure=EVACUATE)"},
	{Stopped, Pending, Scheduler, "automatic evacuation (on_host_failure=EVACUATE)"},
	{Error, Pending, Scheduler, "automatic evacuation (on_host_failure=EVACUATE)"},
	{Scheduled, None, API, "DeleteVM force=true"},
	{Creating, None, API, "DeleteVM force=true"},
	{Running, None, API, "DeleteVM force=true"},
	{Stopped, None, API, "DeleteVM force=true"},
	{Deleting, None, API, "DeleteVM force=true"},
	{Deleting, None, Scheduler, "a delete whose host was fenced finishes without it"},
}

type edge struct {
	from, to Phase
	by       Actor
}

var allowed = func() map[edge]bool {
	m := make(map[edge]bool, len(Transitions))
	for _, t := range Transitions {
		m[edge{t.From, t.To, t.By}] = true
	}
	return m
}()

// Allowed reports whether by may move a VM from phase from to phase to.
func Allowed(from, to Phase, by Actor) bool { return allowed[edge{from, to, by}] }

// TransitionError is the refusal of a transition the table does not allow.
type TransitionError struct {
	From, To Phase
	By       Actor
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("the %s may not move a VM from %s to %s", e.By, PhaseName(e.From), PhaseName(e.To))
}

// Check returns a *TransitionError when Allowed(from, to, by) is false.
func Check(from, to Phase, by Actor) error {
	if Allowed(from, to, by) {
		return nil
	}
	return &TransitionError{From: from, To: to, By: by}
}

// Condition types (VMStatus.conditions). The scheduler owns Scheduled, the
// host the others.
const (
	ConditionScheduled     = "Scheduled"
	ConditionDiskReady     = "DiskReady"
	ConditionNetworkReady  = "NetworkReady"
	ConditionDomainRunning = "DomainRunning"
	ConditionGuestReady    = "GuestReady"
)

// Event kinds (Event.type).
const (
	EventNormal  = "Normal"
	EventWarning = "Warning"
)

// Reasons: CamelCase words in VMStatus.reason, Condition.reason and
// Event.reason. One word may serve several of them.
const (
	// API.
	ReasonCreated         = "Created"
	ReasonDeleteRequested = "DeleteRequested"
	ReasonStartRequested  = "StartRequested"
	ReasonStopRequested   = "StopRequested"
	ReasonRebootRequested = "RebootRequested"
	ReasonRescheduling    = "Rescheduling"
	ReasonMetadataUpdated = "MetadataUpdated"
	ReasonPortExposed     = "PortExposed"
	ReasonPortUnexposed   = "PortUnexposed"

	// Scheduler.
	ReasonScheduled           = "Scheduled"
	ReasonNoValidHost         = "NoValidHost"
	ReasonMaxAttemptsExceeded = "MaxAttemptsExceeded"
	ReasonServerGroupNotFound = "ServerGroupNotFound"
	ReasonHostDown            = "HostDown"
	ReasonHostUp              = "HostUp"
	// The host is fenced (its VMs were destroyed or are known not to run).
	ReasonHostFenced = "HostFenced"
	// The VM was moved off a fenced host, to be rebuilt from its image.
	ReasonEvacuated = "Evacuated"
	// The VM was removed without its fenced host.
	ReasonForceDeleted = "ForceDeleted"

	// Agent.
	ReasonCreating       = "Creating"
	ReasonCreateFailed   = "CreateFailed"
	ReasonDiskFailed     = "DiskFailed"
	ReasonOverlayReady   = "OverlayReady"
	ReasonDiskReady      = "DiskReady"
	ReasonNetworkFailed  = "NetworkFailed"
	ReasonPortsReady     = "PortsReady"
	ReasonNetworkReady   = "NetworkReady"
	ReasonStarted        = "Started"
	ReasonRunning        = "Running"
	ReasonRebooted       = "Rebooted"
	ReasonStopped        = "Stopped"
	ReasonStoppedByGuest = "StoppedByGuest"
	ReasonCrashed        = "Crashed"
	// The domain stopped without a request and without the guest shutting
	// itself down: the host or its libvirtd rebooted, QEMU was killed.
	ReasonStoppedUnexpectedly = "StoppedUnexpectedly"
	// The host started a VM again after it stopped unexpectedly
	// (restart_policy ON_FAILURE).
	ReasonRestarted = "Restarted"
	// The host destroyed what it held of a VM that moved to another host.
	ReasonReleased       = "Released"
	ReasonDomainMissing  = "DomainMissing"
	ReasonMetadataRead   = "MetadataRead"
	ReasonGuestReady     = "GuestReady"
	ReasonNotRunning     = "NotRunning"
	ReasonImageNotFound  = "ImageNotFound"
	ReasonImageUnusable  = "ImageUnusable"
	ReasonImageInvalid   = "ImageInvalid"
	ReasonFlavorTooSmall = "FlavorTooSmall"
	ReasonAddressInvalid = "AddressInvalid"
	// The host serves a metadata update (labels, tags, metadata, SSH keys).
	ReasonMetadataDelivered = "MetadataDelivered"

	// The network's CIDR overlaps a route of the host: its bridge is not built.
	ReasonNetworkOverlapsHost = "NetworkOverlapsHost"
)

// MarkdownTable renders Transitions as the table docs/architecture.md
// carries between its "lifecycle table" markers.
func MarkdownTable() string {
	var b strings.Builder
	b.WriteString("| from | to | by | when |\n|---|---|---|---|\n")
	for _, t := range Transitions {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", PhaseName(t.From), PhaseName(t.To), t.By, t.Why)
	}
	return b.String()
}
