package agent

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

type reportKind int

const (
	reportStatus reportKind = iota
	reportDeleted
	reportReschedule
)

// statusFrom copies the stored status so converge can edit it and compare.
func statusFrom(vm *minicloudv1.VM) *minicloudv1.VMStatus {
	if vm.GetStatus() == nil {
		return &minicloudv1.VMStatus{}
	}
	return proto.Clone(vm.GetStatus()).(*minicloudv1.VMStatus)
}

// observedStatus is the status converge starts from: the stored one, with
// the fields the host owns taken from the host's own last report when that
// is newer than what the assignment stream has delivered so far. Without
// it, a reconcile that runs before its own report comes back would see the
// old conditions and report the same transitions (and events) twice.
func (a *Agent) observedStatus(vm *minicloudv1.VM) *minicloudv1.VMStatus {
	st := statusFrom(vm)
	a.mu.Lock()
	last := a.reported[vm.GetMeta().GetId()]
	a.mu.Unlock()
	switch {
	case last == nil:
	case st.Phase == minicloudv1.VMPhase_VM_PHASE_SCHEDULED, st.Phase == minicloudv1.VMPhase_VM_PHASE_DELETING:
		// Written by the scheduler or the API after our report.
	case last.ObservedResourceVersion < st.ObservedResourceVersion:
	default:
		st.Phase, st.Reason, st.Message = last.Phase, last.Reason, last.Message
		st.Hypervisor = last.Hypervisor
		st.ObservedRebootGeneration = last.ObservedRebootGeneration
		st.ObservedResourceVersion = last.ObservedResourceVersion
		st.ObservedMetadataVersion = max(st.ObservedMetadataVersion, last.ObservedMetadataVersion)
		st.Conditions = proto.Clone(last).(*minicloudv1.VMStatus).Conditions
	}
	return st
}

// setCondition sets a condition and says whether it changed. The transition
// time moves only when the status flips, as in Kubernetes.
func setCondition(st *minicloudv1.VMStatus, typ string, status bool, reason, message string) bool {
	for _, c := range st.Conditions {
		if c.Type != typ {
			continue
		}
		if c.Status == status && c.Reason == reason && c.Message == message {
			return false
		}
		flipped := c.Status != status
		c.Status, c.Reason, c.Message = status, reason, message
		if flipped {
			c.LastTransitionTime = timestamppb.Now()
		}
		return flipped
	}
	st.Conditions = append(st.Conditions, &minicloudv1.Condition{
		Type: typ, Status: status, Reason: reason, Message: message, LastTransitionTime: timestamppb.Now(),
	})
	return status
}

func normal(reason, message string) *minicloudv1.Event {
	return &minicloudv1.Event{Time: timestamppb.Now(), Type: "Normal", Reason: reason, Message: message}
}

func warning(reason, message string) *minicloudv1.Event {
	return &minicloudv1.Event{Time: timestamppb.Now(), Type: "Warning", Reason: reason, Message: message}
}

// report sends what the host observed to the API. A status equal to the
// stored one is not sent, so a reconcile that changes nothing writes
// nothing — otherwise every report would trigger another reconcile.
func (a *Agent) report(ctx context.Context, vm *minicloudv1.VM, st *minicloudv1.VMStatus, kind reportKind, events ...*minicloudv1.Event) error {
	id := vm.GetMeta().GetId()
	if kind == reportStatus && len(events) == 0 && sameObservedStatus(a.observedStatus(vm), st) {
		return nil
	}
	for _, e := range events {
		e.Source = "agent/" + a.cfg.HostName
	}
	req := &minicloudv1.ReportVMStatusRequest{
		Host:       a.cfg.HostName,
		VmId:       vm.GetMeta().GetId(),
		Status:     st,
		Events:     events,
		Deleted:    kind == reportDeleted,
		Reschedule: kind == reportReschedule,
	}
	if _, err := a.hosts.ReportVMStatus(ctx, req); err != nil {
		err = errdefs.FromGRPC(err)
		if errdefs.IsNotFound(err) || errdefs.IsFailedPrecondition(err) {
			// The VM is gone or no longer ours: the assignment stream will
			// tell us, and the next reconcile cleans up.
			a.log.Info("status report refused; VM no longer assigned here", "vm", req.VmId, "err", err)
			return nil
		}
		return fmt.Errorf("report status of VM %s: %w", req.VmId, err)
	}
	a.mu.Lock()
	if kind == reportStatus && st != nil {
		a.reported[id] = proto.Clone(st).(*minicloudv1.VMStatus)
	} else {
		delete(a.reported, id)
	}
	a.mu.Unlock()
	return nil
}

// sameObservedStatus compares the fields the host owns.
func sameObservedStatus(old, st *minicloudv1.VMStatus) bool {
	if old == nil || st == nil {
		return old == st
	}
	if old.Phase != st.Phase || old.Reason != st.Reason || old.Message != st.Message ||
		old.Hypervisor != st.Hypervisor || old.ObservedRebootGeneration != st.ObservedRebootGeneration ||
		old.ObservedResourceVersion != st.ObservedResourceVersion || old.ObservedMetadataVersion != st.ObservedMetadataVersion ||
		len(old.Conditions) != len(st.Conditions) {
		return false
	}
	for i := range old.Conditions {
		o, n := old.Conditions[i], st.Conditions[i]
		if o.Type != n.Type || o.Status != n.Status || o.Reason != n.Reason || o.Message != n.Message {
			return false
		}
	}
	return true
}
