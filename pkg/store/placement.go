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

// Placement is a scheduler's decision for one VM: Claim on Claim.Host,
// and Status (SCHEDULED on that host) replacing the VM's status read at
// StatusRev.
type Placement struct {
	Claim     *minicloudv1.Claim
	Status    *minicloudv1.VMStatus
	StatusRev int64
	Event     *minicloudv1.Event
	Now       time.Time
}

// HostPlacements are placements on one host, added together to its
// allocation Alloc (read at AllocModRevision; nil and 0 if absent).
type HostPlacements struct {
	Alloc            *minicloudv1.HostAllocation
	AllocModRevision int64
	VMs              []Placement
}

// PlaceVMsTxn writes the claims, the host's new allocation (returned, put
// once: a transaction may not write a key twice), the statuses and an event
// per VM, guarded by the allocation's mod revision and every status's. It
// is all or nothing: one VM whose status moved on fails the others too, so
// a caller that meets a conflict should try each VM on its own. When a
// compare fails its Else reads what the scheduler needs to decide again
// (PlaceConflictOf decodes it).
func PlaceVMsTxn(h HostPlacements) (Txn, *minicloudv1.HostAllocation, error) {
	if len(h.VMs) == 0 {
		return Txn{}, nil, fmt.Errorf("place vms: no placements")
	}
	claims := make([]*minicloudv1.Claim, len(h.VMs))
	for i, p := range h.VMs {
		claims[i] = p.Claim
	}
	cmps, ops, alloc, err := AddClaimsOps(claims, h.Alloc, h.AllocModRevision)
	if err != nil {
		return Txn{}, nil, err
	}
	host := claims[0].GetHost()
	t := Txn{
		If:   cmps,
		Then: ops,
		Else: []clientv3.Op{
			clientv3.OpGet(HostAllocKey(host)),
			clientv3.OpGet(ClaimsPrefix(host), clientv3.WithPrefix()),
		},
	}
	for _, p := range h.VMs {
		id := p.Claim.GetVmId()
		statusOp, err := VMStatusOp(id, p.Status)
		if err != nil {
			return Txn{}, nil, err
		}
		t.If = append(t.If, Unchanged(VMStatusKey(id), p.StatusRev))
		t.Then = append(t.Then, statusOp)
		t.Else = append(t.Else, clientv3.OpGet(VMStatusKey(id)))
		if p.Event != nil {
			t.AppendEvents(id, p.Now, p.Event)
		}
	}
	return t, alloc, nil
}

// PlaceConflict is what a failed PlaceVMsTxn read: the host's allocation
// key (nil: absent) and claim keys, and each VM's status, in the order of
// the placements.
type PlaceConflict struct {
	Alloc    *mvccpb.KeyValue
	Claims   []*mvccpb.KeyValue
	Statuses []StatusAt
}

// StatusAt is a VM's status (nil: the VM is gone) and its mod revision.
type StatusAt struct {
	Status *minicloudv1.VMStatus
	Rev    int64
}

// PlaceConflictOf decodes the Else reads of a failed PlaceVMsTxn.
func PlaceConflictOf(resp *etcdserverpb.TxnResponse) (PlaceConflict, error) {
	var c PlaceConflict
	if len(resp.GetResponses()) < 3 {
		return c, fmt.Errorf("placement conflict: %d responses, want at least 3", len(resp.GetResponses()))
	}
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
		c.Alloc = kvs[0]
	}
	c.Claims = resp.Responses[1].GetResponseRange().GetKvs()
	for _, r := range resp.Responses[2:] {
		var s StatusAt
		if kvs := r.GetResponseRange().GetKvs(); len(kvs) > 0 {
			s.Status = &minicloudv1.VMStatus{}
			if err := Decode(kvs[0], s.Status); err != nil {
				return c, err
			}
			s.Rev = kvs[0].ModRevision
		}
		c.Statuses = append(c.Statuses, s)
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
