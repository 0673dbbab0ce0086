package server

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// Host failure: fence, evacuate, delete a host, force-delete a VM. Each
// acts only on a host proved to run none of its VMs (FENCED), the rule of
// Pacemaker ("no recovery without fencing") and of Nova's evacuate; the
// store's transactions compare that the host is still fenced and out of
// contact, so a host that comes back in between keeps its VMs.

// maxEvacuateVMs bounds one EvacuateHost request's vm_ids.
const maxEvacuateVMs = 1000

func (h *hostService) FenceHost(ctx context.Context, req *minicloudv1.FenceHostRequest) (*minicloudv1.Host, error) {
	name := req.GetName()
	if err := validateHostname("host name", name); err != nil {
		return nil, err
	}
	if !req.GetConfirm() {
		return nil, errdefs.Invalid("fencing host %s lets its VMs be started elsewhere: confirm (--confirm) only if the host is powered off or cut off and self-fenced; two copies of a VM writing the same addresses is what fencing exists to prevent", name)
	}
	if len(req.GetReason()) > 255 {
		return nil, errdefs.Invalid("reason is %d characters; keep it under 256", len(req.GetReason()))
	}
	for range maxTxnAttempts {
		st, err := store.ReadHostFailureState(ctx, h.s.etcd, name)
		if err != nil {
			return nil, err
		}
		switch {
		case !st.Registered:
			return nil, hostNotFound(name)
		case st.Alive:
			return nil, errdefs.FailedPrecondition("host %s is UP (its agent renews its lease): a host in contact is not fenced; disable it (`minicloud host disable %s`) and move its VMs instead", name, name)
		case st.Fence != nil:
			return h.s.getHost(ctx, name)
		}
		txn, err := store.FenceHostTxn(name, &minicloudv1.HostFence{
			Time: timestamppb.Now(), By: "operator:" + auth.FromContext(ctx).String(), Reason: req.GetReason(),
		})
		if err != nil {
			return nil, err
		}
		_, ok, err := txn.Commit(ctx, h.s.etcd)
		if err != nil {
			return nil, err
		}
		if ok {
			h.s.log.Warn("host fenced by an operator", "host", name, "by", auth.FromContext(ctx).String(), "reason", req.GetReason())
			return h.s.getHost(ctx, name)
		}
	}
	return nil, tooMuchContention("fence host " + name)
}

// notFencedError explains why a host's VMs cannot leave it.
func notFencedError(st store.HostFailureState, what string) error {
	name := st.Name
	if st.Alive {
		return errdefs.FailedPrecondition("cannot %s: host %s is UP; only a FENCED host's VMs can be moved without it (disable the host to stop new placements)", what, name)
	}
	return errdefs.FailedPrecondition("cannot %s: host %s is UNREACHABLE but not FENCED, so its VMs may still run; wait for it to self-fence (its --fence-after, see `minicloud host show %s`) or, if it is powered off, `minicloud host fence %s --confirm`", what, name, name, name)
}

func (h *hostService) EvacuateHost(ctx context.Context, req *minicloudv1.EvacuateHostRequest) (*minicloudv1.EvacuateHostResponse, error) {
	name := req.GetName()
	if err := validateHostname("host name", name); err != nil {
		return nil, err
	}
	if n := len(req.GetVmIds()); n > maxEvacuateVMs {
		return nil, errdefs.Invalid("%d vm_ids in one request; name at most %d (or none for all)", n, maxEvacuateVMs)
	}
	st, err := store.ReadHostFailureState(ctx, h.s.etcd, name)
	if err != nil {
		return nil, err
	}
	if !st.Registered {
		return nil, hostNotFound(name)
	}
	if st.Fence == nil || st.Alive {
		return nil, notFencedError(st, "evacuate host "+name)
	}
	ids, rev, err := store.VMIDsOnHost(ctx, h.s.etcd, name)
	if err != nil {
		return nil, err
	}
	all, err := store.GetVMs(ctx, h.s.etcd, ids, rev)
	if err != nil {
		return nil, err
	}
	var vms []*minicloudv1.VM
	for _, vm := range all {
		if vm != nil {
			vms = append(vms, vm)
		}
	}
	if want := req.GetVmIds(); len(want) > 0 {
		var chosen []*minicloudv1.VM
		for _, ref := range want {
			vm := findVM(vms, ref)
			if vm == nil {
				return nil, errdefs.NotFound("no VM %s on host %s (evacuate names VMs by id or name; see `minicloud vm list --host %s --all-projects`)", ref, name, name)
			}
			chosen = append(chosen, vm)
		}
		vms = chosen
	}
	resp := &minicloudv1.EvacuateHostResponse{}
	for _, vm := range vms {
		moved, err := h.s.evacuateVM(ctx, vm.GetMeta().GetId(), name)
		if err != nil {
			return nil, fmt.Errorf("evacuate vm %s (%d of %d done): %w", vm.GetMeta().GetName(), len(resp.Vms), len(vms), err)
		}
		if moved != nil {
			resp.Vms = append(resp.Vms, moved)
		}
	}
	h.s.log.Warn("host evacuated", "host", name, "vms", len(resp.Vms))
	return resp, nil
}

// findVM returns the VM of vms whose id or name is ref.
func findVM(vms []*minicloudv1.VM, ref string) *minicloudv1.VM {
	for _, vm := range vms {
		if vm.GetMeta().GetId() == ref || vm.GetMeta().GetName() == ref {
			return vm
		}
	}
	return nil
}

// evacuateVM moves one VM off its fenced host (a DELETING one is removed
// instead: nobody will confirm its delete). It returns the VM as it is
// afterwards (nil: it is gone or left the host meanwhile).
func (s *Server) evacuateVM(ctx context.Context, id, host string) (*minicloudv1.VM, error) {
	for range maxTxnAttempts {
		vm, err := store.GetVM(ctx, s.etcd, id)
		if errdefs.IsNotFound(err) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if vm.GetStatus().GetHost() != host {
			return nil, nil
		}
		now := time.Now()
		var txn store.Txn
		if vm.GetSpec().GetDeletionRequested() {
			txn, err = store.ForceRemoveVMTxn(ctx, s.etcd, vm, true)
		} else {
			txn, err = store.EvacuateVMTxn(ctx, s.etcd, vm, lifecycle.API, "api", now)
		}
		if err != nil {
			return nil, errdefs.FailedPrecondition("%v", err)
		}
		_, ok, err := txn.Commit(ctx, s.etcd)
		if err != nil {
			return nil, err
		}
		if ok {
			if vm.GetSpec().GetDeletionRequested() {
				return nil, nil
			}
			return store.GetVM(ctx, s.etcd, id)
		}
		st, err := store.ReadHostFailureState(ctx, s.etcd, host)
		if err != nil {
			return nil, err
		}
		if st.Fence == nil || st.Alive {
			return nil, notFencedError(st, "evacuate vm "+vm.GetMeta().GetName())
		}
	}
	return nil, tooMuchContention("evacuate vm " + id)
}

func (h *hostService) DeleteHost(ctx context.Context, req *minicloudv1.DeleteHostRequest) (*minicloudv1.DeleteHostResponse, error) {
	name := req.GetName()
	if err := validateHostname("host name", name); err != nil {
		return nil, err
	}
	for range maxTxnAttempts {
		st, err := store.ReadHostFailureState(ctx, h.s.etcd, name)
		if err != nil {
			return nil, err
		}
		if !st.Registered {
			return nil, hostNotFound(name)
		}
		if st.Alive {
			return nil, errdefs.FailedPrecondition("host %s is UP: stop its agent (or fence it) before removing it, so it does not register again", name)
		}
		ids, rev, err := store.VMIDsOnHost(ctx, h.s.etcd, name)
		if err != nil {
			return nil, err
		}
		if len(ids) > 0 {
			hint := "delete them or move them"
			if st.Fence != nil {
				hint = fmt.Sprintf("evacuate them (`minicloud host evacuate %s`) or delete them (`minicloud vm delete --force`)", name)
			}
			return nil, errdefs.FailedPrecondition("host %s still holds %d VMs (e.g. %s): %s first", name, len(ids), ids[0], hint)
		}
		_, ok, err := store.DeleteHostTxn(name, rev).Commit(ctx, h.s.etcd)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		// Its certificates go to the deny-list, so it cannot register
		// again without a new join token.
		serials, err := store.RevokeHost(ctx, h.s.etcd, name)
		if err != nil && !errdefs.IsNotFound(err) {
			return nil, fmt.Errorf("host %s removed, but revoking its certificates failed (run `minicloud host revoke %s`): %w", name, name, err)
		}
		h.s.log.Warn("host removed", "host", name, "revoked_serials", serials)
		return &minicloudv1.DeleteHostResponse{}, nil
	}
	return nil, tooMuchContention("delete host " + name)
}

// forceDeleteTxn is DeleteVM with force: the VM's host must be FENCED (or
// no longer registered).
func (s *Server) forceDeleteTxn(ctx context.Context, vm *minicloudv1.VM) (store.Txn, error) {
	host := vm.GetStatus().GetHost()
	st, err := store.ReadHostFailureState(ctx, s.etcd, host)
	if err != nil {
		return store.Txn{}, err
	}
	if st.Registered && (st.Fence == nil || st.Alive) {
		return store.Txn{}, notFencedError(st, "force-delete vm "+vm.GetMeta().GetName())
	}
	if err := lifecycle.Check(vm.GetStatus().GetPhase(), lifecycle.None, lifecycle.API); err != nil {
		return store.Txn{}, errdefs.FailedPrecondition("vm %s: %v", vm.GetMeta().GetName(), err)
	}
	return store.ForceRemoveVMTxn(ctx, s.etcd, vm, st.Registered)
}
