package server

import (
	"context"
	"errors"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// vmView is the merged state of every VM as a watch has seen it.
type vmView struct {
	specs    map[string]*minicloudv1.VM       // meta+spec, resource_version set
	statuses map[string]*minicloudv1.VMStatus // status_version set
}

func (v *vmView) merged(id string) *minicloudv1.VM {
	spec, ok := v.specs[id]
	if !ok {
		return nil
	}
	vm := &minicloudv1.VM{Meta: spec.Meta, Spec: spec.Spec, Status: v.statuses[id]}
	if vm.Status == nil {
		vm.Status = &minicloudv1.VMStatus{}
	}
	return vm
}

// apply folds one etcd event on vms/spec or vms/status into the view and
// returns the VM id it touched.
func (v *vmView) apply(ev *clientv3.Event) (string, error) {
	key := string(ev.Kv.Key)
	id := store.LastSegment(key)
	isSpec := strings.HasPrefix(key, store.VMSpecPrefix)
	switch {
	case ev.Type == mvccpb.DELETE && isSpec:
		delete(v.specs, id)
	case ev.Type == mvccpb.DELETE:
		delete(v.statuses, id)
	case isSpec:
		vm, err := store.DecodeVM(ev.Kv, nil)
		if err != nil {
			return "", err
		}
		vm.Status = nil
		v.specs[id] = vm
	default:
		st := &minicloudv1.VMStatus{}
		if err := store.Decode(ev.Kv, st); err != nil {
			return "", err
		}
		st.StatusVersion = ev.Kv.ModRevision
		v.statuses[id] = st
	}
	return id, nil
}

// watchVMs streams every change of the VMs that match, in etcd revision
// order, as whole VMs. With fromRev 0 it first hands the current matching
// VMs to snapshot; otherwise it replays every change after fromRev. A VM
// that stops matching (deleted, moved to another host) is sent as DELETED
// with its last state. One watch covers vms/spec/ and vms/status/ (they
// are adjacent ranges), so spec and status changes arrive in one order and
// a transaction that writes both is one event.
func (s *Server) watchVMs(ctx context.Context, fromRev int64, match func(*minicloudv1.VM) bool,
	snapshot func([]*minicloudv1.VM, int64) error,
	emit func(minicloudv1.WatchEventType, *minicloudv1.VM, int64) error,
) error {
	vms, rev, err := store.ListVMs(ctx, s.etcd, fromRev)
	if err != nil {
		switch {
		case errors.Is(err, rpctypes.ErrCompacted):
			return errdefs.Conflict("resource_version %d is too old (compacted): watch again from 0", fromRev)
		case errors.Is(err, rpctypes.ErrFutureRev):
			return errdefs.Invalid("resource_version %d is in the future", fromRev)
		}
		return err
	}
	view := &vmView{specs: make(map[string]*minicloudv1.VM, len(vms)), statuses: make(map[string]*minicloudv1.VMStatus, len(vms))}
	sent := map[string]*minicloudv1.VM{} // VMs the client holds, by id
	var initial []*minicloudv1.VM
	for _, vm := range vms {
		id := vm.GetMeta().GetId()
		view.statuses[id] = vm.Status
		view.specs[id] = &minicloudv1.VM{Meta: vm.Meta, Spec: vm.Spec}
		if match(vm) {
			sent[id] = vm
			initial = append(initial, vm)
		}
	}
	if fromRev == 0 {
		if err := snapshot(initial, rev); err != nil {
			return err
		}
	}

	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	defer context.AfterFunc(s.streams, cancel)()
	wch := s.etcd.Watch(wctx, store.VMSpecPrefix, clientv3.WithRange(store.PrefixEnd(store.VMStatusPrefix)), clientv3.WithRev(rev+1))
	lastRev := rev
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				return errdefs.Conflict("watch fell behind etcd compaction at revision %d: watch again from 0", resp.CompactRevision)
			}
			return errdefs.Wrap(errdefs.KindUnavailable, err, "watch VMs")
		}
		for i := 0; i < len(resp.Events); {
			// Changes of one transaction share a revision: fold them all in
			// before sending, so a VM is never sent half-written.
			evRev := resp.Events[i].Kv.ModRevision
			var touched []string
			seen := map[string]bool{}
			for ; i < len(resp.Events) && resp.Events[i].Kv.ModRevision == evRev; i++ {
				id, err := view.apply(resp.Events[i])
				if err != nil {
					return err
				}
				if !seen[id] {
					seen[id] = true
					touched = append(touched, id)
				}
			}
			for _, id := range touched {
				if err := emitChange(id, view, sent, match, evRev, emit); err != nil {
					return err
				}
			}
			lastRev = evRev
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.streams.Err() != nil {
		return errdefs.Unavailable("API server is shutting down: watch again from resource_version %d", lastRev)
	}
	return errdefs.Unavailable("watch VMs: etcd watch closed")
}

func emitChange(id string, view *vmView, sent map[string]*minicloudv1.VM, match func(*minicloudv1.VM) bool, rev int64,
	emit func(minicloudv1.WatchEventType, *minicloudv1.VM, int64) error,
) error {
	cur := view.merged(id)
	prev, had := sent[id]
	now := cur != nil && match(cur)
	switch {
	case now && !had:
		sent[id] = cur
		return emit(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, proto.CloneOf(cur), rev)
	case now && had:
		sent[id] = cur
		return emit(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, proto.CloneOf(cur), rev)
	case !now && had:
		delete(sent, id)
		last := prev
		if cur != nil {
			last = cur
		}
		return emit(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED, proto.CloneOf(last), rev)
	}
	return nil
}
