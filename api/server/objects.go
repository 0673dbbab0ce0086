package server

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// Flavors, networks and server groups are single keys with the same life:
// created once (never updated), read, and deleted when no VM uses them.

// metaFor returns the meta of a new object.
func metaFor(name, project string) *minicloudv1.ObjectMeta {
	return &minicloudv1.ObjectMeta{Id: newID(), Name: name, Project: project, CreateTime: timestamppb.Now()}
}

// createObject stores obj at key if the key is absent and every extra
// compare holds; it sets obj's resource version. exists is the error when
// the key is taken.
func (s *Server) createObject(ctx context.Context, key string, obj proto.Message, meta *minicloudv1.ObjectMeta, exists error, extra ...clientv3.Cmp) (bool, error) {
	return s.createObjectWith(ctx, key, obj, meta, exists, extra, nil)
}

// createObjectWith is createObject with more writes in the same transaction
// (e.g. the network's VNI).
func (s *Server) createObjectWith(ctx context.Context, key string, obj proto.Message, meta *minicloudv1.ObjectMeta, exists error, extra []clientv3.Cmp, extraOps []clientv3.Op) (bool, error) {
	op, err := store.PutOp(key, obj)
	if err != nil {
		return false, err
	}
	resp, err := s.etcd.Txn(ctx).
		If(append([]clientv3.Cmp{store.Absent(key)}, extra...)...).
		Then(append([]clientv3.Op{op}, extraOps...)...).
		Else(clientv3.OpGet(key, clientv3.WithCountOnly())).
		Commit()
	if err != nil {
		return false, errdefs.Wrap(errdefs.KindUnavailable, err, "store %s", key)
	}
	if !resp.Succeeded {
		if resp.Responses[0].GetResponseRange().GetCount() > 0 {
			return false, exists
		}
		return false, nil // an extra compare failed: the caller re-checks and retries
	}
	meta.ResourceVersion = resp.Header.Revision
	return true, nil
}

// getObject reads key into obj and sets its resource version; notFound is
// the error when the key is missing.
func (s *Server) getObject(ctx context.Context, key string, obj proto.Message, meta func() *minicloudv1.ObjectMeta, notFound error) (int64, error) {
	rev, err := store.Get(ctx, s.etcd, key, obj)
	if errdefs.IsNotFound(err) {
		return 0, notFound
	}
	if err != nil {
		return 0, err
	}
	if m := meta(); m != nil {
		m.ResourceVersion = rev
	}
	return rev, nil
}

// quotaShare is what an object counts in its project's quota.
type quotaShare struct {
	project string
	delta   *minicloudv1.QuotaUsage
}

// chargeOps reads the project's usage and returns the compares and write
// that charge delta to it, or ResourceExhausted if it does not fit. The
// caller folds them into its create's transaction and, when that fails its
// compares, calls again.
func (s *Server) chargeOps(ctx context.Context, share quotaShare) ([]clientv3.Cmp, []clientv3.Op, error) {
	u, err := store.ReadCountedUsage(ctx, s.etcd, share.project)
	if err != nil {
		return nil, nil, err
	}
	next, err := store.Charge(share.project, u.Usage, share.delta, store.EffectiveLimits(s.quotaDefaults, u.Overrides))
	if err != nil {
		return nil, nil, err
	}
	return store.ChargeOps(u, next)
}

// deleteUnused deletes key (read at modRev) unless a VM matching used
// exists; it retries when VMs change between scan and delete. share, if
// set, goes back to its project's quota in the delete's transaction.
func (s *Server) deleteUnused(ctx context.Context, kind, name, key string, reread func() (int64, error), used func(*minicloudv1.VM) bool, share *quotaShare, extraOps ...clientv3.Op) error {
	for range maxTxnAttempts {
		modRev, err := reread()
		if err != nil {
			return err
		}
		vm, scanRev, err := s.vmUsing(ctx, used)
		if err != nil {
			return err
		}
		if vm != nil {
			return inUseError(kind, name, vm)
		}
		cmps := []clientv3.Cmp{store.Unchanged(key, modRev), store.UnchangedSince(store.VMSpecPrefix, scanRev)}
		ops := append([]clientv3.Op{clientv3.OpDelete(key)}, extraOps...)
		if share != nil {
			qc, qo, err := store.ReadReleaseOps(ctx, s.etcd, share.project, share.delta)
			if err != nil {
				return err
			}
			cmps, ops = append(cmps, qc...), append(ops, qo...)
		}
		_, ok, err := store.Commit(ctx, s.etcd, cmps, ops)
		if err != nil || ok {
			return err
		}
	}
	return tooMuchContention("delete " + kind + " " + name)
}
