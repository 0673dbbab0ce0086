package store

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// UpdateVMSpec writes vm's meta and spec and appends events to its log, in
// one transaction that holds only while the spec key is still at fromRev
// (the resource_version vm was read at). ok is false, and nothing is
// written, when another write came first; rev is the new resource_version.
func UpdateVMSpec(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM, fromRev int64, events ...*minicloudv1.Event) (rev int64, ok bool, err error) {
	id := vm.GetMeta().GetId()
	specOp, err := VMSpecOp(vm)
	if err != nil {
		return 0, false, err
	}
	evOps, err := EventOps(id, time.Now(), events...)
	if err != nil {
		return 0, false, err
	}
	return Commit(ctx, kv, []clientv3.Cmp{Unchanged(VMSpecKey(id), fromRev)}, append([]clientv3.Op{specOp}, evOps...))
}
