package apiserver

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

const maxEventsPerReport = 64

// ReportVMStatus records what a host observed for one of its VMs. Only the
// VM's current host may report: a host that lost the VM (rescheduled,
// deleted) gets FailedPrecondition and must clean up instead.
func (h *hostService) ReportVMStatus(ctx context.Context, req *minicloudv1.ReportVMStatusRequest) (*minicloudv1.ReportVMStatusResponse, error) {
	host := req.GetHost()
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
	if ph := req.GetStatus().GetPhase(); ph != minicloudv1.VMPhase_VM_PHASE_UNSPECIFIED {
		if _, ok := minicloudv1.VMPhase_name[int32(ph)]; !ok {
			return nil, errdefs.Invalid("status.phase %d is not a VM phase", ph)
		}
	}
	for range maxTxnAttempts {
		vm, err := store.GetVM(ctx, h.s.etcd, req.GetVmId())
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
		cmps, ops, err := h.s.reportOps(ctx, vm, req)
		if err != nil {
			return nil, err
		}
		if len(ops) == 0 {
			return &minicloudv1.ReportVMStatusResponse{}, nil
		}
		_, ok, err := store.Commit(ctx, h.s.etcd, cmps, ops)
		if err != nil {
			return nil, err
		}
		if ok {
			return &minicloudv1.ReportVMStatusResponse{}, nil
		}
	}
	return nil, tooMuchContention("report status of vm " + req.GetVmId())
}

// reportOps turns one report into the compares and ops of its transaction.
func (s *Server) reportOps(ctx context.Context, vm *minicloudv1.VM, req *minicloudv1.ReportVMStatusRequest) ([]clientv3.Cmp, []clientv3.Op, error) {
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
	if req.GetDeleted() || (req.GetReschedule() && vm.GetSpec().GetDeletionRequested()) {
		if !vm.GetSpec().GetDeletionRequested() {
			return nil, nil, errdefs.FailedPrecondition("vm %s was not deleted (it is not DELETING): report deleted only after DeleteVM", vm.Meta.Name)
		}
		cmps, ops, err := s.removeVMOps(ctx, vm)
		if err == nil {
			s.log.Info("vm removed", "vm", vm.Meta.Name, "project", vm.Meta.Project, "id", id, "host", host)
		}
		return cmps, ops, err
	}

	next := proto.CloneOf(vm.GetStatus())
	if st := req.GetStatus(); st != nil {
		if st.GetPhase() != minicloudv1.VMPhase_VM_PHASE_UNSPECIFIED {
			next.Phase = st.GetPhase()
		}
		next.Conditions = st.GetConditions()
		next.Message = st.GetMessage()
		next.Reason = st.GetReason()
		next.Hypervisor = st.GetHypervisor()
		next.ObservedRebootGeneration = st.GetObservedRebootGeneration()
		next.ObservedResourceVersion = st.GetObservedResourceVersion()
		next.ObservedMetadataVersion = st.GetObservedMetadataVersion()
	}
	if vm.GetSpec().GetDeletionRequested() {
		next.Phase = minicloudv1.VMPhase_VM_PHASE_DELETING // until the host reports deleted
	}
	if !req.GetReschedule() && len(events) == 0 && proto.Equal(next, vm.GetStatus()) {
		// Nothing new: writing would only wake every watcher (and the
		// reporting agent itself) for no change.
		return nil, nil, nil
	}
	next.UpdateTime = timestamppb.New(now)
	cmps := vmUnchanged(vm)
	var ops []clientv3.Op
	if req.GetReschedule() {
		next.Phase = minicloudv1.VMPhase_VM_PHASE_PENDING
		next.Host = ""
		next.TriedHosts = append(next.TriedHosts, host)
		next.HostDown = false
		events = append(events, &minicloudv1.Event{
			Type: "Warning", Reason: "Rescheduling", Source: "api",
			Message: fmt.Sprintf("host %s gave the VM back (%s); the scheduler will choose another host", host, next.GetMessage()),
		})
		claimCmps, claimOps, err := s.releaseClaimOps(ctx, host, id)
		if err != nil {
			return nil, nil, err
		}
		cmps, ops = append(cmps, claimCmps...), claimOps
	}
	statusOp, err := store.VMStatusOp(id, next)
	if err != nil {
		return nil, nil, err
	}
	evOps, err := store.EventOps(id, now, events...)
	if err != nil {
		return nil, nil, err
	}
	return cmps, append(append(ops, statusOp), evOps...), nil
}
