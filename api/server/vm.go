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

// vmService implements minicloudv1.VMServiceServer.
type vmService struct {
	minicloudv1.UnimplementedVMServiceServer
	s *Server
}

func (v *vmService) CreateVM(ctx context.Context, req *minicloudv1.CreateVMRequest) (*minicloudv1.VM, error) {
	return v.s.createVM(ctx, req)
}

func (v *vmService) GetVM(ctx context.Context, req *minicloudv1.GetVMRequest) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	return v.s.lookupVM(ctx, project, req.GetName())
}

func (v *vmService) ListVMs(ctx context.Context, req *minicloudv1.ListVMsRequest) (*minicloudv1.ListVMsResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	return v.s.listVMsPage(ctx, req, project)
}

// DeleteVM removes a VM that no host holds at once; otherwise it marks it
// DELETING and the host finishes with ReportVMStatus(deleted=true). With
// force, a VM whose host is FENCED (or removed) is removed at once.
func (v *vmService) DeleteVM(ctx context.Context, req *minicloudv1.DeleteVMRequest) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	for range maxTxnAttempts {
		vm, err := v.s.lookupVM(ctx, project, req.GetName())
		if err != nil {
			return nil, err
		}
		if err := checkResourceVersion("vm", req.GetName(), req.GetResourceVersion(), vm.GetMeta().GetResourceVersion()); err != nil {
			return nil, err
		}
		now := time.Now()
		var txn store.Txn
		forced := req.GetForce() && vm.GetStatus().GetHost() != ""
		if forced {
			// The host is gone for good (fenced or removed): nobody will
			// confirm a delete, so finish it here.
			txn, err = v.s.forceDeleteTxn(ctx, vm)
		} else if vm.GetStatus().GetHost() == "" {
			// Nothing on any hypervisor: remove it now.
			if err := lifecycle.Check(vm.GetStatus().GetPhase(), lifecycle.None, lifecycle.API); err != nil {
				return nil, errdefs.FailedPrecondition("vm %s: %v", vm.Meta.Name, err)
			}
			txn, err = store.RemoveVMTxn(ctx, v.s.etcd, vm)
		} else {
			if vm.GetSpec().GetDeletionRequested() {
				return vm, nil
			}
			if err := lifecycle.Check(vm.GetStatus().GetPhase(), lifecycle.Deleting, lifecycle.API); err != nil {
				return nil, errdefs.FailedPrecondition("vm %s: %v", vm.Meta.Name, err)
			}
			next := proto.CloneOf(vm)
			markDeleting(next, now)
			txn, err = store.MarkVMDeletingTxn(vm, next, now, &minicloudv1.Event{
				Type: lifecycle.EventNormal, Reason: lifecycle.ReasonDeleteRequested, Source: "api",
				Message: fmt.Sprintf("waiting for host %s to remove the domain, disk and network", vm.Status.Host),
			})
		}
		if err != nil {
			return nil, err
		}
		_, ok, err := txn.Commit(ctx, v.s.etcd)
		if err != nil {
			return nil, err
		}
		if ok {
			// The returned VM keeps the revisions read before the delete, so
			// a Watch from them sees it go.
			markDeleting(vm, now)
			if forced {
				v.s.log.Warn("vm force-deleted without its host", "vm", vm.Meta.Name, "project", project, "id", vm.Meta.Id, "host", vm.Status.Host)
				return vm, nil
			}
			v.s.log.Info("vm delete requested", "vm", vm.Meta.Name, "project", project, "id", vm.Meta.Id, "host", vm.Status.Host)
			return vm, nil
		}
	}
	return nil, tooMuchContention("delete vm " + req.GetName())
}

func markDeleting(vm *minicloudv1.VM, now time.Time) {
	vm.Spec.DeletionRequested = true
	vm.Spec.LifecycleVersion = 0
	if vm.Spec.DeletionTime == nil {
		vm.Spec.DeletionTime = timestamppb.New(now)
	}
	vm.Status.Phase = lifecycle.Deleting
	vm.Status.UpdateTime = timestamppb.New(now)
}

func (v *vmService) StartVM(ctx context.Context, req *minicloudv1.VMActionRequest) (*minicloudv1.VM, error) {
	return v.s.updateSpec(ctx, req, lifecycle.ReasonStartRequested, func(vm *minicloudv1.VM) error {
		vm.Spec.PowerState = minicloudv1.PowerState_POWER_STATE_RUNNING
		return nil
	})
}

func (v *vmService) StopVM(ctx context.Context, req *minicloudv1.VMActionRequest) (*minicloudv1.VM, error) {
	return v.s.updateSpec(ctx, req, lifecycle.ReasonStopRequested, func(vm *minicloudv1.VM) error {
		vm.Spec.PowerState = minicloudv1.PowerState_POWER_STATE_STOPPED
		return nil
	})
}

func (v *vmService) RebootVM(ctx context.Context, req *minicloudv1.VMActionRequest) (*minicloudv1.VM, error) {
	return v.s.updateSpec(ctx, req, lifecycle.ReasonRebootRequested, func(vm *minicloudv1.VM) error {
		if vm.Spec.PowerState != minicloudv1.PowerState_POWER_STATE_RUNNING {
			return errdefs.FailedPrecondition("vm %s is stopped: start it instead of rebooting", vm.Meta.Name)
		}
		vm.Spec.RebootGeneration++
		return nil
	})
}

// updateSpec applies change to a VM's spec under optimistic concurrency.
// Every call writes the spec, even when nothing changes: a new resource
// version is how a host learns that the user asked again (e.g. start a VM
// whose guest powered itself off).
func (s *Server) updateSpec(ctx context.Context, req *minicloudv1.VMActionRequest, reason string, change func(*minicloudv1.VM) error) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	for range maxTxnAttempts {
		vm, err := s.lookupVM(ctx, project, req.GetName())
		if err != nil {
			return nil, err
		}
		if err := checkResourceVersion("vm", req.GetName(), req.GetResourceVersion(), vm.GetMeta().GetResourceVersion()); err != nil {
			return nil, err
		}
		if vm.GetSpec().GetDeletionRequested() {
			return nil, errdefs.FailedPrecondition("vm %s is being deleted", vm.Meta.Name)
		}
		if err := change(vm); err != nil {
			return nil, err
		}
		// A lifecycle write: the host acts on this version again.
		vm.Spec.LifecycleVersion = 0
		txn, err := store.UpdateVMSpecTxn(vm, time.Now(), &minicloudv1.Event{Type: lifecycle.EventNormal, Reason: reason, Source: "api"})
		if err != nil {
			return nil, err
		}
		rev, ok, err := txn.Commit(ctx, s.etcd)
		if err != nil {
			return nil, err
		}
		if ok {
			vm.Meta.ResourceVersion = rev
			return vm, nil
		}
		// Lost a race: a pinned version that went stale fails the check
		// at the top on the next pass (another event append does not).
	}
	return nil, tooMuchContention(reason + " vm " + req.GetName())
}

func (v *vmService) ListVMEvents(ctx context.Context, req *minicloudv1.ListVMEventsRequest) (*minicloudv1.ListVMEventsResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	vm, err := v.s.lookupVM(ctx, project, req.GetName())
	if err != nil {
		return nil, err
	}
	evs, log, err := store.ReadEventLog(ctx, v.s.etcd, vm.Meta.Id)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.ListVMEventsResponse{Events: evs, EventsDropped: log.Dropped(len(evs))}, nil
}

func (v *vmService) WatchVMs(req *minicloudv1.WatchVMsRequest, stream minicloudv1.VMService_WatchVMsServer) error {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return err
	}
	if req.GetName() != "" {
		if err := nameOrIDRef(req.GetName()); err != nil {
			return err
		}
	}
	if req.GetResourceVersion() < 0 {
		return errdefs.Invalid("resource_version %d is negative", req.GetResourceVersion())
	}
	match := func(vm *minicloudv1.VM) bool {
		if !req.GetAllProjects() && vm.GetMeta().GetProject() != project {
			return false
		}
		return req.GetName() == "" || vm.GetMeta().GetName() == req.GetName() || vm.GetMeta().GetId() == req.GetName()
	}
	send := func(typ minicloudv1.WatchEventType, vm *minicloudv1.VM, rev int64) error {
		return stream.Send(&minicloudv1.WatchVMsResponse{Type: typ, Vm: vm, ResourceVersion: rev})
	}
	return v.s.watchVMs(stream.Context(), req.GetResourceVersion(), match,
		func(vms []*minicloudv1.VM, rev int64) error {
			for _, vm := range vms {
				if err := send(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, vm, rev); err != nil {
					return err
				}
			}
			return nil
		}, send)
}
