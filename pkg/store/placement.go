package store

import (
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// The scheduler's write protocols.

// Placement is a scheduler's decision: Claim on Claim.Host, added to the
// host's allocation Alloc (read at AllocModRevision; nil and 0 if absent),
// and Status (SCHEDULED on that host) replacing the VM's status read at
// StatusRev.
type Placement struct {
	Claim            *minicloudv1.Claim
	Alloc            *minicloudv1.HostAllocation
	AllocModRevision int64
	Status           *minicloudv1.VMStatus
	StatusRev        int64
	Event            *minicloudv1.Event
	Now              time.Time
}

// PlaceVMTxn writes the claim, the host's new allocation (returned), the
// status and an event, guarded by the allocation's and the status's mod
// revisions. When a compare fails its Else reads what the scheduler needs
// to decide again (PlaceConflictOf decodes it).
func PlaceVMTxn(p Placement) (Txn, *minicloudv1.HostAllocation, error) {
	id, host := p.Claim.GetVmId(), p.Claim.GetHost()
	cmps, ops, alloc, err := AddClaimOps(p.Claim, p.Alloc, p.AllocModRevision)
	if err != nil {
		return Txn{}, nil, err
	}
	statusOp, err := VMStatusOp(id, p.Status)
	if err != nil {
		return Txn{}, nil, err
	}
	t := Txn{
		If:   append(cmps, Unchanged(VMStatusKey(id), p.StatusRev)),
		Then: append(ops, statusOp),
		Else: []clientv3.Op{
			clientv3.OpGet(HostAllocKey(host)),
			clientv3.OpGet(ClaimsPrefix(host), clientv3.WithPrefix()),
			clientv3.OpGet(VMStatusKey(id)),
		},
	}
	if p.Event != nil {
		t.AppendEvents(id, p.Now, p.Event)
	}
	return t, alloc, nil
}

// PlaceConflict is what a failed PlaceVMTxn read: the host's allocation
// key (nil: absent) and claim keys, and the VM's status (nil: the VM is
// gone) with its mod revision.
type PlaceConflict struct {
	Alloc     *mvccpb.KeyValue
	Claims    []*mvccpb.KeyValue
	Status    *minicloudv1.VMStatus
	StatusRev int64
}

// PlaceConflictOf decodes the Else reads of a failed PlaceVMTxn.
func PlaceConflictOf(resp *etcdserverpb.TxnResponse) (PlaceConflict, error) {
	var c PlaceConflict
	if len(resp.GetResponses()) != 3 {
		return c, fmt.Errorf("placement conflict: %d responses, want 3", len(resp.GetResponses()))
	}
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
		c.Alloc = kvs[0]
	}
	c.Claims = resp.Responses[1].GetResponseRange().GetKvs()
	if kvs := resp.Responses[2].GetResponseRange().GetKvs(); len(kvs) > 0 {
		c.Status = &minicloudv1.VMStatus{}
		if err := Decode(kvs[0], c.Status); err != nil {
			return c, err
		}
		c.StatusRev = kvs[0].ModRevision
	}
	return c, nil
}

// VMStatusTxn replaces a VM's status read at statusRev with st and appends
// events: the scheduler's writes that place nothing (ERROR when no host
// fits, host_down).
func VMStatusTxn(id string, statusRev int64, st *minicloudv1.VMStatus, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	statusOp, err := VMStatusOp(id, st)
	if err != nil {
		return Txn{}, err
	}
	t := Txn{If: []clientv3.Cmp{Unchanged(VMStatusKey(id), statusRev)}, Then: []clientv3.Op{statusOp}}
	t.AppendEvents(id, now, events...)
	return t, nil
}
