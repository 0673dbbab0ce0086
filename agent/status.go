package agent

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
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
	case st.Phase == lifecycle.Deleting:
		// Written by the API after our report.
	case st.Phase == lifecycle.Scheduled && last.GetAssignmentEpoch() != st.GetAssignmentEpoch():
		// A placement after our report (the VM left and came back).
		// SCHEDULED of the placement we reported on is only the stream
		// not having delivered our report yet: a create reports CREATING
		// with RUNNING (creatingreport.go), and a pass in between (a
		// domain event) must not create it, and its events, again.
	case last.ObservedResourceVersion < st.ObservedResourceVersion:
	default:
		lifecycle.MergeHostStatus(st, last)
	}
	return st
}

// setCondition sets a condition of st now; see lifecycle.SetCondition.
func setCondition(st *minicloudv1.VMStatus, typ string, status bool, reason, message string) bool {
	return lifecycle.SetCondition(st, typ, status, reason, message, time.Now())
}

func normal(reason, message string) *minicloudv1.Event {
	return lifecycle.NewEvent(lifecycle.EventNormal, reason, message, time.Now())
}

func warning(reason, message string) *minicloudv1.Event {
	return lifecycle.NewEvent(lifecycle.EventWarning, reason, message, time.Now())
}

// report sends what the host observed to the API. A status equal to the
// stored one is not sent, so a reconcile that changes nothing writes
// nothing — otherwise every report would trigger another reconcile.
func (a *Agent) report(ctx context.Context, vm *minicloudv1.VM, st *minicloudv1.VMStatus, kind reportKind, events ...*minicloudv1.Event) error {
	id := vm.GetMeta().GetId()
	if kind == reportStatus && len(events) == 0 && lifecycle.SameHostStatus(a.observedStatus(vm), st) {
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
		// The API refuses a report for an older epoch: the VM moved.
		AssignmentEpoch: vm.GetStatus().GetAssignmentEpoch(),
	}
	if _, err := a.hosts.ReportVMStatus(ctx, req); err != nil {
		err = errdefs.FromGRPC(err)
		if errdefs.IsNotFound(err) || errdefs.IsFailedPrecondition(err) {
			// The VM is gone, no longer ours, or moved on (e.g. DELETING)
			// past what we observed (the lifecycle table refuses the
			// transition): the assignment stream will tell us, and the
			// next reconcile acts on the fresh state.
			a.log.Info("status report refused; the VM changed since this host looked", "vm", req.VmId, "err", err)
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
