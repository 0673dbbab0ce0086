package server

import (
	"context"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// Port forwards: a host port of the VM's host DNATed to a port of the
// VM's primary address (store/portforward.go has the keys and why the
// claim is cluster-wide; docs/networking.md the rules on the host).

// portForwardRange is the configured range, or the default.
func (s *Server) portForwardRange() store.PortRange {
	if s.fwdPorts == (store.PortRange{}) {
		return store.DefaultPortForwardRange
	}
	return s.fwdPorts
}

func describeForward(f *minicloudv1.PortForward) string {
	return fmt.Sprintf("host port %d/%s -> guest port %d", f.GetHostPort(), store.ProtocolName(f.GetProtocol()), f.GetGuestPort())
}

func checkProtocol(p minicloudv1.PortProtocol) error {
	switch p {
	case minicloudv1.PortProtocol_PORT_PROTOCOL_UNSPECIFIED, minicloudv1.PortProtocol_PORT_PROTOCOL_TCP, minicloudv1.PortProtocol_PORT_PROTOCOL_UDP:
		return nil
	}
	return errdefs.Invalid("protocol %d: want tcp or udp", p)
}

// ExposeVMPort adds a forward to the VM's spec and claims its host port in
// one transaction. A port forwarded to any other VM is ALREADY_EXISTS; the
// same forward again is a no-op, and the same host port to another guest
// port of this VM is refused (unexpose it first), so a retry never changes
// what a forward means.
func (v *vmService) ExposeVMPort(ctx context.Context, req *minicloudv1.ExposeVMPortRequest) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := nameOrIDRef(req.GetName()); err != nil {
		return nil, err
	}
	f := req.GetForward()
	if f == nil {
		return nil, errdefs.Invalid("forward is required: a host port and a guest port")
	}
	if err := checkProtocol(f.GetProtocol()); err != nil {
		return nil, err
	}
	if err := v.s.portForwardRange().CheckHostPort(f.GetHostPort()); err != nil {
		return nil, err
	}
	if g := f.GetGuestPort(); g < 1 || g > 65535 {
		return nil, errdefs.Invalid("guest port %d: want 1-65535", g)
	}
	fwd := &minicloudv1.PortForward{Protocol: minicloudv1.PortProtocol_PORT_PROTOCOL_TCP, HostPort: f.GetHostPort(), GuestPort: f.GetGuestPort()}
	if f.GetProtocol() == minicloudv1.PortProtocol_PORT_PROTOCOL_UDP {
		fwd.Protocol = f.GetProtocol()
	}
	for range maxTxnAttempts {
		vm, err := v.s.lookupVM(ctx, project, req.GetName())
		if err != nil {
			return nil, err
		}
		if err := checkResourceVersion("vm", req.GetName(), req.GetResourceVersion(), vm.GetMeta().GetResourceVersion()); err != nil {
			return nil, err
		}
		if vm.GetSpec().GetDeletionRequested() {
			return nil, errdefs.FailedPrecondition("vm %s is being deleted", vm.GetMeta().GetName())
		}
		fwds := vm.GetSpec().GetPortForwards()
		if i := store.FindPortForward(fwds, fwd.Protocol, fwd.HostPort); i >= 0 {
			if fwds[i].GetGuestPort() == fwd.GuestPort {
				return vm, nil
			}
			return nil, errdefs.AlreadyExists("vm %s already forwards %s: unexpose it first", vm.GetMeta().GetName(), describeForward(fwds[i]))
		}
		if len(fwds) >= store.MaxPortForwardsPerVM {
			return nil, errdefs.Invalid("vm %s has %d port forwards; a VM has at most %d", vm.GetMeta().GetName(), len(fwds), store.MaxPortForwardsPerVM)
		}
		if err := v.s.portHolder(ctx, project, vm, fwd); err != nil {
			return nil, err
		}
		next := forwardsChanged(vm, append(slices.Clone(fwds), fwd))
		txn, err := store.ExposePortTxn(next, fwd, time.Now(), &minicloudv1.Event{
			Type: lifecycle.EventNormal, Reason: lifecycle.ReasonPortExposed, Source: "api", Message: describeForward(fwd),
		})
		ok, err := v.s.commitForwards(ctx, vm, next, txn, err, "vm port exposed", fwd)
		if err != nil {
			return nil, err
		}
		if ok {
			return next, nil
		}
		// Lost a race: the spec changed or someone took the port; the
		// next pass reads both again.
	}
	return nil, tooMuchContention("expose a port of vm " + req.GetName())
}

// forwardsChanged is vm with fwds as its forwards, to be written.
func forwardsChanged(vm *minicloudv1.VM, fwds []*minicloudv1.PortForward) *minicloudv1.VM {
	next := &minicloudv1.VM{Meta: proto.CloneOf(vm.GetMeta()), Spec: proto.CloneOf(vm.GetSpec())}
	next.Spec.PortForwards = fwds
	// Not a lifecycle write: the host must not take it for a start.
	if next.Spec.LifecycleVersion == 0 {
		next.Spec.LifecycleVersion = vm.GetMeta().GetResourceVersion()
	}
	return next
}

// commitForwards commits txn (built with buildErr) writing next over vm;
// ok false and no error: a race was lost, read again.
func (s *Server) commitForwards(ctx context.Context, vm, next *minicloudv1.VM, txn store.Txn, buildErr error, what string, f *minicloudv1.PortForward) (bool, error) {
	if buildErr != nil {
		return false, buildErr
	}
	rev, ok, err := txn.Commit(ctx, s.etcd)
	if err != nil || !ok {
		return false, err
	}
	next.Meta.ResourceVersion = rev
	next.Status = vm.GetStatus()
	s.log.Info(what, "vm", vm.GetMeta().GetName(), "project", vm.GetMeta().GetProject(), "id", vm.GetMeta().GetId(), "forward", describeForward(f))
	return true, nil
}

// portHolder refuses a host port another VM holds, naming it (only by id
// when it is another project's).
func (s *Server) portHolder(ctx context.Context, project string, vm *minicloudv1.VM, fwd *minicloudv1.PortForward) error {
	holder, _, err := store.PortForwardHolder(ctx, s.etcd, fwd.GetProtocol(), fwd.GetHostPort())
	if err != nil || holder == "" || holder == vm.GetMeta().GetId() {
		return err
	}
	port := fmt.Sprintf("%d/%s", fwd.GetHostPort(), store.ProtocolName(fwd.GetProtocol()))
	other, err := s.lookupVM(ctx, project, holder)
	switch {
	case err == nil:
		return errdefs.AlreadyExists("host port %s is already forwarded to vm %s (id %s): pick another port or `minicloud vm unexpose %s --port %s`",
			port, other.GetMeta().GetName(), holder, other.GetMeta().GetName(), port)
	case errdefs.IsNotFound(err):
		return errdefs.AlreadyExists("host port %s is already forwarded to a VM of another project (id %s): pick another port", port, holder)
	}
	return err
}

// UnexposeVMPort removes a forward from the spec and releases its host
// port claim in one transaction.
func (v *vmService) UnexposeVMPort(ctx context.Context, req *minicloudv1.UnexposeVMPortRequest) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := nameOrIDRef(req.GetName()); err != nil {
		return nil, err
	}
	if err := checkProtocol(req.GetProtocol()); err != nil {
		return nil, err
	}
	if p := req.GetHostPort(); p < 1 || p > 65535 {
		return nil, errdefs.Invalid("host port %d: want 1-65535", p)
	}
	for range maxTxnAttempts {
		vm, err := v.s.lookupVM(ctx, project, req.GetName())
		if err != nil {
			return nil, err
		}
		if err := checkResourceVersion("vm", req.GetName(), req.GetResourceVersion(), vm.GetMeta().GetResourceVersion()); err != nil {
			return nil, err
		}
		i := store.FindPortForward(vm.GetSpec().GetPortForwards(), req.GetProtocol(), req.GetHostPort())
		if i < 0 {
			return vm, nil
		}
		gone := vm.GetSpec().GetPortForwards()[i]
		holder, holderRev, err := store.PortForwardHolder(ctx, v.s.etcd, req.GetProtocol(), req.GetHostPort())
		if err != nil {
			return nil, err
		}
		if holder != vm.GetMeta().GetId() {
			holderRev = 0
		}
		next := forwardsChanged(vm, slices.Delete(slices.Clone(vm.GetSpec().GetPortForwards()), i, i+1))
		txn, err := store.UnexposePortTxn(next, req.GetProtocol(), req.GetHostPort(), holderRev, time.Now(), &minicloudv1.Event{
			Type: lifecycle.EventNormal, Reason: lifecycle.ReasonPortUnexposed, Source: "api", Message: describeForward(gone),
		})
		ok, err := v.s.commitForwards(ctx, vm, next, txn, err, "vm port unexposed", gone)
		if err != nil {
			return nil, err
		}
		if ok {
			return next, nil
		}
	}
	return nil, tooMuchContention("unexpose a port of vm " + req.GetName())
}
