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
	vms, rev, err := store.ListVMs(ctx, v.s.etcd, 0)
	if err != nil {
		return nil, err
	}
	out := vms[:0]
	for _, vm := range vms {
		if (req.GetAllProjects() || vm.GetMeta().GetProject() == project) &&
			(req.GetHost() == "" || vm.GetStatus().GetHost() == req.GetHost()) {
			out = append(out, vm)
		}
	}
	return &minicloudv1.ListVMsResponse{Vms: out, ResourceVersion: rev}, nil
}

// DeleteVM removes a VM that no host holds at once; otherwise it marks it
// DELETING and the host finishes with ReportVMStatus(deleted=true).
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
		var (
			cmps []clientv3.Cmp
			ops  []clientv3.Op
		)
		if vm.GetStatus().GetHost() == "" {
			// Nothing on any hypervisor: remove it now.
			cmps, ops, err = v.s.removeVMOps(ctx, vm)
		} else {
			if vm.GetSpec().GetDeletionRequested() {
				return vm, nil
			}
			cmps, ops, err = v.s.markDeletingOps(vm, now)
		}
		if err != nil {
			return nil, err
		}
		_, ok, err := store.Commit(ctx, v.s.etcd, cmps, ops)
		if err != nil {
			return nil, err
		}
		if ok {
			// The returned VM keeps the revisions read before the delete, so
			// a Watch from them sees it go.
			markDeleting(vm, now)
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
	vm.Status.Phase = minicloudv1.VMPhase_VM_PHASE_DELETING
	vm.Status.UpdateTime = timestamppb.New(now)
}

// markDeletingOps returns the first phase of a two-phase delete.
func (s *Server) markDeletingOps(vm *minicloudv1.VM, now time.Time) ([]clientv3.Cmp, []clientv3.Op, error) {
	next := proto.CloneOf(vm)
	markDeleting(next, now)
	specOp, err := store.VMSpecOp(next)
	if err != nil {
		return nil, nil, err
	}
	statusOp, err := store.VMStatusOp(vm.Meta.Id, next.Status)
	if err != nil {
		return nil, nil, err
	}
	evOps, err := store.EventOps(vm.Meta.Id, now, &minicloudv1.Event{
		Type: "Normal", Reason: "DeleteRequested", Source: "api",
		Message: fmt.Sprintf("waiting for host %s to remove the domain, disk and network", vm.Status.Host),
	})
	if err != nil {
		return nil, nil, err
	}
	return vmUnchanged(vm), append([]clientv3.Op{specOp, statusOp}, evOps...), nil
}

// vmUnchanged holds while neither spec nor status changed since vm was read.
func vmUnchanged(vm *minicloudv1.VM) []clientv3.Cmp {
	id := vm.GetMeta().GetId()
	return []clientv3.Cmp{
		store.Unchanged(store.VMSpecKey(id), vm.GetMeta().GetResourceVersion()),
		store.Unchanged(store.VMStatusKey(id), vm.GetStatus().GetStatusVersion()),
	}
}

// removeVMOps returns the compares and ops that remove a VM for good: its
// keys, its addresses and the capacity claim on its host.
func (s *Server) removeVMOps(ctx context.Context, vm *minicloudv1.VM) ([]clientv3.Cmp, []clientv3.Op, error) {
	cmps := vmUnchanged(vm)
	ops := store.VMKeysOps(vm)
	addrCmps, addrOps, err := s.releaseAddressOps(ctx, vm)
	if err != nil {
		return nil, nil, err
	}
	cmps, ops = append(cmps, addrCmps...), append(ops, addrOps...)
	if host := vm.GetStatus().GetHost(); host != "" {
		claimCmps, claimOps, err := s.releaseClaimOps(ctx, host, vm.GetMeta().GetId())
		if err != nil {
			return nil, nil, err
		}
		cmps, ops = append(cmps, claimCmps...), append(ops, claimOps...)
	}
	return cmps, ops, nil
}

// releaseAddressOps frees the VM's addresses: every IPAM key that still
// names this VM is deleted, under a compare that it did not change. A key
// that is gone or names another VM is left alone, so a damaged IPAM range
// never makes a VM undeletable.
func (s *Server) releaseAddressOps(ctx context.Context, vm *minicloudv1.VM) ([]clientv3.Cmp, []clientv3.Op, error) {
	addrs := vm.GetStatus().GetAddresses()
	if len(addrs) == 0 {
		return nil, nil, nil
	}
	reads := make([]clientv3.Op, 0, len(addrs))
	for _, a := range addrs {
		reads = append(reads, clientv3.OpGet(store.NetworkKey(vm.GetMeta().GetProject(), a.GetNetwork())))
	}
	resp, err := store.ReadTxn(ctx, s.etcd, reads...)
	if err != nil {
		return nil, nil, err
	}
	var keys []clientv3.Op
	for i, a := range addrs {
		kvs := resp.Responses[i].GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			continue // the network is gone, and its addresses with it
		}
		nw := &minicloudv1.Network{}
		if err := store.Decode(kvs[0], nw); err != nil {
			return nil, nil, err
		}
		keys = append(keys, clientv3.OpGet(store.IPAMKey(nw.GetMeta().GetId(), a.GetIp())))
	}
	if len(keys) == 0 {
		return nil, nil, nil
	}
	if resp, err = store.ReadTxn(ctx, s.etcd, keys...); err != nil {
		return nil, nil, err
	}
	var (
		cmps []clientv3.Cmp
		ops  []clientv3.Op
	)
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().GetKvs() {
			if string(kv.Value) == vm.GetMeta().GetId() {
				cmps = append(cmps, store.Unchanged(string(kv.Key), kv.ModRevision))
				ops = append(ops, clientv3.OpDelete(string(kv.Key)))
			}
		}
	}
	return cmps, ops, nil
}

func (s *Server) releaseClaimOps(ctx context.Context, host, vmID string) ([]clientv3.Cmp, []clientv3.Op, error) {
	st, err := store.ReadClaimState(ctx, s.etcd, host, vmID)
	if err != nil {
		return nil, nil, err
	}
	return store.ReleaseClaimOps(st)
}

func (v *vmService) StartVM(ctx context.Context, req *minicloudv1.VMActionRequest) (*minicloudv1.VM, error) {
	return v.s.updateSpec(ctx, req, "StartRequested", func(vm *minicloudv1.VM) error {
		vm.Spec.PowerState = minicloudv1.PowerState_POWER_STATE_RUNNING
		return nil
	})
}

func (v *vmService) StopVM(ctx context.Context, req *minicloudv1.VMActionRequest) (*minicloudv1.VM, error) {
	return v.s.updateSpec(ctx, req, "StopRequested", func(vm *minicloudv1.VM) error {
		vm.Spec.PowerState = minicloudv1.PowerState_POWER_STATE_STOPPED
		return nil
	})
}

func (v *vmService) RebootVM(ctx context.Context, req *minicloudv1.VMActionRequest) (*minicloudv1.VM, error) {
	return v.s.updateSpec(ctx, req, "RebootRequested", func(vm *minicloudv1.VM) error {
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
		specOp, err := store.VMSpecOp(vm)
		if err != nil {
			return nil, err
		}
		evOps, err := store.EventOps(vm.Meta.Id, time.Now(), &minicloudv1.Event{Type: "Normal", Reason: reason, Source: "api"})
		if err != nil {
			return nil, err
		}
		rev, ok, err := store.Commit(ctx, s.etcd,
			[]clientv3.Cmp{store.Unchanged(store.VMSpecKey(vm.Meta.Id), vm.Meta.ResourceVersion)},
			append([]clientv3.Op{specOp}, evOps...))
		if err != nil {
			return nil, err
		}
		if ok {
			vm.Meta.ResourceVersion = rev
			return vm, nil
		}
		if req.GetResourceVersion() != 0 {
			// The caller pinned a version that just went stale.
			return nil, checkResourceVersion("vm", req.GetName(), req.GetResourceVersion(), -1)
		}
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
	evs, _, err := store.List(ctx, v.s.etcd, store.VMEventsPrefix(vm.Meta.Id), func() *minicloudv1.Event { return &minicloudv1.Event{} })
	if err != nil {
		return nil, err
	}
	out := make([]*minicloudv1.Event, 0, len(evs))
	for _, e := range evs {
		out = append(out, e.Value)
	}
	return &minicloudv1.ListVMEventsResponse{Events: out}, nil
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
