package store

import (
	"context"
	"fmt"
	"sort"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// A VM is stored as two keys: vms/spec/<id> holds the VM with meta and spec
// (status cleared) and vms/status/<id> holds its VMStatus. Readers merge
// them; meta.resource_version is the spec key's mod revision and
// status.status_version the status key's.

// VMSpecOp returns the op that stores vm's meta and spec (never its status
// or the revision fields, which etcd owns).
func VMSpecOp(vm *minicloudv1.VM) (clientv3.Op, error) {
	stored := &minicloudv1.VM{Meta: vm.GetMeta(), Spec: vm.GetSpec()}
	if stored.Meta.GetResourceVersion() != 0 {
		// Copied, not zeroed in place: vm may be shared (a cache's). A
		// new VM's is 0 already, and is not copied.
		stored.Meta = proto.CloneOf(stored.Meta)
		stored.Meta.ResourceVersion = 0
	}
	return PutOp(VMSpecKey(vm.GetMeta().GetId()), stored)
}

// VMStatusOp returns the op that stores a VM's status.
func VMStatusOp(id string, st *minicloudv1.VMStatus) (clientv3.Op, error) {
	stored := st
	if st.GetStatusVersion() != 0 {
		stored = proto.CloneOf(st) // as VMSpecOp's meta
		stored.StatusVersion = 0
	}
	return PutOp(VMStatusKey(id), stored)
}

// DecodeVM merges a spec key and a status key (status may be nil) into one
// VM carrying both revisions.
func DecodeVM(spec, status *mvccpb.KeyValue) (*minicloudv1.VM, error) {
	vm := &minicloudv1.VM{}
	if err := Decode(spec, vm); err != nil {
		return nil, err
	}
	if vm.Meta == nil {
		vm.Meta = &minicloudv1.ObjectMeta{}
	}
	vm.Meta.ResourceVersion = spec.ModRevision
	vm.Status = &minicloudv1.VMStatus{}
	if status != nil {
		if err := Decode(status, vm.Status); err != nil {
			return nil, err
		}
		vm.Status.StatusVersion = status.ModRevision
	}
	return vm, nil
}

// GetVM reads one VM by id (spec and status in one snapshot).
func GetVM(ctx context.Context, kv clientv3.KV, id string) (*minicloudv1.VM, error) {
	vm, _, err := getVM(ctx, kv, id, false)
	return vm, err
}

// GetVMAndEventLog is GetVM that also reads the state of the VM's event
// log in the same snapshot, for a write that appends events
// (Txn.KnownEventLog): one round trip instead of two.
func GetVMAndEventLog(ctx context.Context, kv clientv3.KV, id string) (*minicloudv1.VM, EventLog, error) {
	return getVM(ctx, kv, id, true)
}

func getVM(ctx context.Context, kv clientv3.KV, id string, withLog bool) (*minicloudv1.VM, EventLog, error) {
	var reads Reads
	spec, status := reads.Get(VMSpecKey(id)), reads.Get(VMStatusKey(id))
	var seq Read
	if withLog {
		seq = reads.Get(VMEventSeqKey(id))
	}
	if err := reads.Do(ctx, kv); err != nil {
		return nil, EventLog{}, err
	}
	if spec.First() == nil {
		return nil, EventLog{}, errdefs.NotFound("vm %s not found", id)
	}
	vm, err := DecodeVM(spec.First(), status.First())
	if err != nil || !withLog {
		return vm, EventLog{}, err
	}
	var log EventLog
	if kv := seq.First(); kv != nil {
		if log, err = ParseEventLog(kv.Value, kv.ModRevision); err != nil {
			return nil, EventLog{}, fmt.Errorf("vm %s: %w", id, err)
		}
	}
	return vm, log, nil
}

// ListVMs reads every VM (spec and status in one snapshot), sorted by
// project and name, and the revision of the snapshot. rev 0 reads the
// current state.
func ListVMs(ctx context.Context, kv clientv3.KV, rev int64) ([]*minicloudv1.VM, int64, error) {
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if rev > 0 {
		opts = append(opts, clientv3.WithRev(rev))
	}
	var reads Reads
	specs, statusKVs := reads.Get(VMSpecPrefix, opts...), reads.Get(VMStatusPrefix, opts...)
	if err := reads.Do(ctx, kv); err != nil {
		return nil, 0, err
	}
	statuses := make(map[string]*mvccpb.KeyValue)
	for _, kv := range statusKVs.KVs() {
		statuses[LastSegment(string(kv.Key))] = kv
	}
	vms := make([]*minicloudv1.VM, 0, len(specs.KVs()))
	for _, kv := range specs.KVs() {
		vm, err := DecodeVM(kv, statuses[LastSegment(string(kv.Key))])
		if err != nil {
			return nil, 0, err
		}
		vms = append(vms, vm)
	}
	sortVMs(vms)
	if rev == 0 {
		rev = reads.Revision()
	}
	return vms, rev, nil
}

// sortVMs orders VMs by project, then name.
func sortVMs(vms []*minicloudv1.VM) {
	sort.Slice(vms, func(i, j int) bool {
		a, b := vms[i].GetMeta(), vms[j].GetMeta()
		if a.GetProject() != b.GetProject() {
			return a.GetProject() < b.GetProject()
		}
		return a.GetName() < b.GetName()
	})
}

// VMKeysOps returns the ops that remove every key of a VM except IPAM and
// claims (which the caller releases with their own compares): spec,
// status, user-data, name index, events and their counter.
func VMKeysOps(vm *minicloudv1.VM) []clientv3.Op {
	id := vm.GetMeta().GetId()
	return []clientv3.Op{
		clientv3.OpDelete(VMSpecKey(id)),
		clientv3.OpDelete(VMStatusKey(id)),
		clientv3.OpDelete(VMUserDataKey(id)),
		clientv3.OpDelete(VMNameKey(vm.GetMeta().GetProject(), vm.GetMeta().GetName())),
		clientv3.OpDelete(VMEventsPrefix(id), clientv3.WithPrefix()),
		clientv3.OpDelete(VMEventSeqKey(id)),
	}
}

// maxReadOps is how many gets one read transaction carries.
const maxReadOps = MaxTxnOps

// GetVMs reads the VMs with ids at revision rev (spec and status), in
// order; a VM that does not exist there is nil. It sends one read
// transaction per 64 VMs, all at rev, so the result is one snapshot.
func GetVMs(ctx context.Context, kv clientv3.KV, ids []string, rev int64) ([]*minicloudv1.VM, error) {
	out := make([]*minicloudv1.VM, 0, len(ids))
	for len(ids) > 0 {
		batch := ids[:min(len(ids), maxReadOps/2)]
		ids = ids[len(batch):]
		var reads Reads
		specs, statuses := make([]Read, len(batch)), make([]Read, len(batch))
		for i, id := range batch {
			specs[i] = reads.Get(VMSpecKey(id), clientv3.WithRev(rev))
			statuses[i] = reads.Get(VMStatusKey(id), clientv3.WithRev(rev))
		}
		if err := reads.Do(ctx, kv); err != nil {
			return nil, err
		}
		for i := range batch {
			if specs[i].First() == nil {
				out = append(out, nil)
				continue
			}
			vm, err := DecodeVM(specs[i].First(), statuses[i].First())
			if err != nil {
				return nil, err
			}
			out = append(out, vm)
		}
	}
	return out, nil
}
