package server

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

const maxEventsPerReport = 64

// ReportVMStatus records what a host observed for one of its VMs. Only the
// VM's current host may report: a host that lost the VM (rescheduled,
// deleted) gets FailedPrecondition and must clean up instead.
func (h *hostService) ReportVMStatus(ctx context.Context, req *minicloudv1.ReportVMStatusRequest) (*minicloudv1.ReportVMStatusResponse, error) {
	host := req.GetHost()
	if err := h.s.authorizeHost(ctx, host); err != nil {
		return nil, err
	}
	if err := validateHostname("host name", host); err != nil {
		return nil, err
	}
	if req.GetVmId() == "" {
		return nil, errdefs.Invalid("vm_id is required")
	}
	if len(req.GetEvents()) > maxEventsPerReport {
		return nil, errdefs.Invalid("%d events in one report; send at most %d", len(req.GetEvents()), maxEventsPerReport)
	}
	if req.GetDeleted() && req.GetReschedule() {
		return nil, errdefs.Invalid("deleted and reschedule are exclusive")
	}
	if ph := req.GetStatus().GetPhase(); ph != lifecycle.None {
		if _, ok := minicloudv1.VMPhase_name[int32(ph)]; !ok {
			return nil, errdefs.Invalid("status.phase %d is not a VM phase", ph)
		}
	}
	if req.GetReleasedConfirmed() {
		if req.GetDeleted() || req.GetReschedule() || req.GetStatus() != nil {
			return nil, errdefs.Invalid("released_confirmed stands alone: no status, deleted or reschedule with it")
		}
		// The host destroyed what it held of a VM that left it while it
		// was fenced; the record was only for it.
		if _, err := h.s.etcd.Delete(ctx, store.HostReleasedKey(host, req.GetVmId())); err != nil {
			return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "remove release record of vm %s on host %s", req.GetVmId(), host)
		}
		return &minicloudv1.ReportVMStatusResponse{}, nil
	}
	for range maxTxnAttempts {
		// The VM and its event log's counter in one read: the report
		// appends events, and Commit would read the counter on its own,
		// a second round trip before every report's write (most of them
		// a create's RUNNING, hack/agentbench's "status → watch").
		vm, log, err := store.GetVMAndEventLog(ctx, h.s.etcd, req.GetVmId())
		if errdefs.IsNotFound(err) {
			return nil, errdefs.NotFound("vm %s does not exist (any more): the host should remove what it holds for it", req.GetVmId())
		}
		if err != nil {
			return nil, err
		}
		if cur := vm.GetStatus().GetHost(); cur != host {
			if cur == "" {
				return nil, errdefs.FailedPrecondition("vm %s is not assigned to any host, not to %s", vm.Meta.Name, host)
			}
			return nil, errdefs.FailedPrecondition("vm %s is assigned to host %s, not to %s", vm.Meta.Name, cur, host)
		}
		if e := req.GetAssignmentEpoch(); e != 0 && e != vm.GetStatus().GetAssignmentEpoch() {
			// The VM left the host and came back (evacuated, placed
			// again): what the host observed is of an older copy.
			return nil, errdefs.FailedPrecondition("vm %s: the report is for assignment epoch %d, the current one is %d; the host must drop the old copy", vm.Meta.Name, e, vm.GetStatus().GetAssignmentEpoch())
		}
		txn, err := h.s.reportTxn(ctx, vm, req)
		if err != nil {
			return nil, err
		}
		if txn == nil {
			return &minicloudv1.ReportVMStatusResponse{}, nil
		}
		txn.KnownEventLog(vm.GetMeta().GetId(), log)
		rev, ok, err := txn.Commit(ctx, h.s.etcd)
		if err != nil {
			return nil, err
		}
		if ok && txn.Usage != nil {
			// A removal: the project's next create is charged on the
			// usage it left, not on the one it made stale.
			h.s.creates.usageWritten(*txn.Usage, rev)
		}
		if ok {
			return &minicloudv1.ReportVMStatusResponse{}, nil
		}
	}
	return nil, tooMuchContention("report status of vm " + req.GetVmId())
}

// reportTxn turns one report into its transaction (nil: nothing to write).
func (s *Server) reportTxn(ctx context.Context, vm *minicloudv1.VM, req *minicloudv1.ReportVMStatusRequest) (*store.Txn, error) {
	host, id := req.GetHost(), vm.GetMeta().GetId()
	now := time.Now()
	events := make([]*minicloudv1.Event, 0, len(req.GetEvents())+1)
	for _, ev := range req.GetEvents() {
		ev = proto.CloneOf(ev)
		if ev.Source == "" {
			ev.Source = "agent/" + host
		}
		events = append(events, ev)
	}
	cur := vm.GetStatus().GetPhase()
	if req.GetDeleted() || (req.GetReschedule() && vm.GetSpec().GetDeletionRequested()) {
		if !vm.GetSpec().GetDeletionRequested() {
			return nil, errdefs.FailedPrecondition("vm %s was not deleted (it is not DELETING): report deleted only after DeleteVM", vm.Meta.Name)
		}
		if err := lifecycle.Check(cur, lifecycle.None, lifecycle.Agent); err != nil {
			return nil, errdefs.FailedPrecondition("vm %s: %v", vm.Meta.Name, err)
		}
		txn, err := store.RemoveVMTxn(ctx, s.etcd, vm)
		if err != nil {
			return nil, err
		}
		s.log.Info("vm removed", "vm", vm.Meta.Name, "project", vm.Meta.Project, "id", id, "host", host)
		return &txn, nil
	}

	next := proto.CloneOf(vm.GetStatus())
	if st := req.GetStatus(); st != nil {
		lifecycle.MergeHostStatus(next, st)
		// A DELETING VM stays DELETING until its host reports deleted: the
		// table allows a host no transition out of it but removal.
		if err := lifecycle.Check(cur, next.GetPhase(), lifecycle.Agent); err != nil {
			return nil, errdefs.FailedPrecondition("vm %s: %v", vm.Meta.Name, err)
		}
	}
	if req.GetReschedule() {
		// From what the host reported with it, if anything (e.g. ERROR).
		if err := lifecycle.Check(next.GetPhase(), lifecycle.Pending, lifecycle.API); err != nil {
			return nil, errdefs.FailedPrecondition("vm %s cannot be given back to the scheduler: %v", vm.Meta.Name, err)
		}
	}
	if !req.GetReschedule() && len(events) == 0 && proto.Equal(next, vm.GetStatus()) {
		// Nothing new: writing would only wake every watcher (and the
		// reporting agent itself) for no change.
		return nil, nil
	}
	next.UpdateTime = timestamppb.New(now)
	if !req.GetReschedule() {
		txn, err := store.UpdateVMStatusTxn(vm, next, now, events...)
		return &txn, err
	}
	next.Phase = lifecycle.Pending
	next.Host = ""
	next.TriedHosts = append(next.TriedHosts, host)
	next.HostDown = false
	events = append(events, &minicloudv1.Event{
		Type: lifecycle.EventWarning, Reason: lifecycle.ReasonRescheduling, Source: "api",
		Message: fmt.Sprintf("host %s gave the VM back (%s); the scheduler will choose another host", host, next.GetMessage()),
	})
	txn, err := store.RescheduleVMTxn(ctx, s.etcd, vm, next, now, events...)
	return &txn, err
}
