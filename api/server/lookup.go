package server

import (
	"context"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// lookupVM finds a VM of project by name, or by id when ref is a UUID that
// names no VM.
func (s *Server) lookupVM(ctx context.Context, project, ref string) (*minicloudv1.VM, error) {
	if err := nameOrIDRef(ref); err != nil {
		return nil, err
	}
	resp, err := s.etcd.Get(ctx, store.VMNameKey(project, ref))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "look up vm %s", ref)
	}
	id := ref
	if len(resp.Kvs) > 0 {
		id = string(resp.Kvs[0].Value)
	} else if _, err := uuid.Parse(ref); err != nil {
		return nil, vmNotFound(project, ref)
	}
	vm, err := store.GetVM(ctx, s.etcd, id)
	if errdefs.IsNotFound(err) || (err == nil && vm.GetMeta().GetProject() != project) {
		return nil, vmNotFound(project, ref)
	}
	return vm, err
}

func vmNotFound(project, ref string) error {
	return errdefs.NotFound("vm %s not found in project %s (see `minicloud vm list`)", ref, project)
}

// vmUsing returns a VM whose spec matches used (nil if none) and the
// revision of the scan. A delete that found no user compares
// store.UnchangedSince(store.VMSpecPrefix, rev) so that no VM can start
// using the object between the scan and the delete.
func (s *Server) vmUsing(ctx context.Context, used func(*minicloudv1.VM) bool) (*minicloudv1.VM, int64, error) {
	resp, err := s.etcd.Get(ctx, store.VMSpecPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, errdefs.Wrap(errdefs.KindUnavailable, err, "scan VMs")
	}
	for _, kv := range resp.Kvs {
		vm, err := store.DecodeVM(kv, nil)
		if err != nil {
			return nil, 0, err
		}
		if used(vm) {
			return vm, resp.Header.Revision, nil
		}
	}
	return nil, resp.Header.Revision, nil
}

// ImageInUse returns the name of a VM that uses image ("" if none). It is
// the image service's InUse hook.
func (s *Server) ImageInUse(ctx context.Context, image string) (string, error) {
	vm, _, err := s.vmUsing(ctx, func(vm *minicloudv1.VM) bool { return vm.GetSpec().GetImage() == image })
	if err != nil || vm == nil {
		return "", err
	}
	return vm.GetMeta().GetProject() + "/" + vm.GetMeta().GetName(), nil
}

// inUseError is the FailedPrecondition for deleting an object a VM uses.
func inUseError(kind, name string, vm *minicloudv1.VM) error {
	return errdefs.FailedPrecondition("%s %s is used by vm %s (project %s): delete that VM first", kind, name, vm.GetMeta().GetName(), vm.GetMeta().GetProject())
}

// maxTxnAttempts bounds the read-compare-write retries of one request.
const maxTxnAttempts = 32

func tooMuchContention(what string) error {
	return errdefs.Conflict("%s: the object kept changing under us (%d attempts); retry", what, maxTxnAttempts)
}
