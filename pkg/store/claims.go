package store

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Capacity claims.
//
// A VM placed on a host holds a Claim at claims/<host>/<vmid>, and
// hosts/alloc/<host> is the sum of the host's claims. Both keys change
// together in one transaction that compares the mod revision of
// hosts/alloc/<host> with the revision the writer read, so concurrent
// writers (two scheduler replicas, a scheduler and the API releasing a
// claim) serialise on the allocation key and never lose an update.
//
// ReadClaimState + AddClaimOps / ReleaseClaimOps are the claim change that
// the write protocols fold into their transactions: PlaceVMsTxn adds
// claims, RescheduleVMTxn and RemoveVMTxn release one.

// ClaimState is a VM's claim on a host and the host's allocation, read at
// one etcd revision. A zero mod revision means the key does not exist.
type ClaimState struct {
	Host, VMID       string
	Claim            *minicloudv1.Claim
	ClaimModRevision int64
	Alloc            *minicloudv1.HostAllocation
	AllocModRevision int64
}

// ReadClaimState reads claims/<host>/<vmID> and hosts/alloc/<host> in one
// consistent read.
func ReadClaimState(ctx context.Context, kv clientv3.KV, host, vmID string) (ClaimState, error) {
	s := ClaimState{Host: host, VMID: vmID}
	var reads Reads
	claim, alloc := reads.Get(ClaimKey(host, vmID)), reads.Get(HostAllocKey(host))
	if err := reads.Do(ctx, kv); err != nil {
		return s, fmt.Errorf("read claim of vm %s on host %s: %w", vmID, host, err)
	}
	if kv := claim.First(); kv != nil {
		s.Claim = &minicloudv1.Claim{}
		if err := Decode(kv, s.Claim); err != nil {
			return s, err
		}
		s.ClaimModRevision = kv.ModRevision
	}
	if kv := alloc.First(); kv != nil {
		s.Alloc = &minicloudv1.HostAllocation{}
		if err := Decode(kv, s.Alloc); err != nil {
			return s, err
		}
		s.AllocModRevision = kv.ModRevision
	}
	return s, nil
}

// AddClaimOps returns the compares and ops that add claim to its host's
// allocation alloc (read at allocModRev; nil and 0 if absent), and the new
// allocation. The compares also require that the VM has no claim on that
// host yet, so a claim is never counted twice.
func AddClaimOps(claim *minicloudv1.Claim, alloc *minicloudv1.HostAllocation, allocModRev int64) ([]clientv3.Cmp, []clientv3.Op, *minicloudv1.HostAllocation, error) {
	return AddClaimsOps([]*minicloudv1.Claim{claim}, alloc, allocModRev)
}

// AddClaimsOps is AddClaimOps for several claims on one host: one compare
// and one put of the allocation, which grows by all of them.
func AddClaimsOps(claims []*minicloudv1.Claim, alloc *minicloudv1.HostAllocation, allocModRev int64) ([]clientv3.Cmp, []clientv3.Op, *minicloudv1.HostAllocation, error) {
	if len(claims) == 0 {
		return nil, nil, nil, errdefs.Invalid("no claims to add")
	}
	host := claims[0].GetHost()
	cmps := []clientv3.Cmp{Unchanged(HostAllocKey(host), allocModRev)}
	ops := make([]clientv3.Op, 1, len(claims)+1) // ops[0]: the allocation's put, once it is summed
	next := alloc
	for _, claim := range claims {
		if claim.GetHost() == "" || claim.GetVmId() == "" {
			return nil, nil, nil, errdefs.Invalid("claim needs a host and a vm id")
		}
		if claim.GetHost() != host {
			return nil, nil, nil, errdefs.Invalid("claims on hosts %s and %s in one allocation change", host, claim.GetHost())
		}
		next = addResources(next, claim.GetResources(), 1)
		claimBytes, err := proto.Marshal(claim)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("encode claim of vm %s: %w", claim.GetVmId(), err)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(ClaimKey(host, claim.GetVmId())), "=", 0))
		ops = append(ops, clientv3.OpPut(ClaimKey(host, claim.GetVmId()), string(claimBytes)))
	}
	allocBytes, err := proto.Marshal(next)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("encode allocation of host %s: %w", host, err)
	}
	ops[0] = clientv3.OpPut(HostAllocKey(host), string(allocBytes))
	return cmps, ops, next, nil
}

// ReleaseClaimOps returns the compares and ops that remove s's claim and
// subtract it from the host's allocation. Fold them into your own
// transaction; if it fails on the compares, re-read (ReadClaimState) and
// rebuild. Without a claim there is nothing to release: the only compare
// is that the claim still does not exist, and there are no ops.
func ReleaseClaimOps(s ClaimState) ([]clientv3.Cmp, []clientv3.Op, error) {
	claimKey := ClaimKey(s.Host, s.VMID)
	if s.Claim == nil {
		return []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(claimKey), "=", 0)}, nil, nil
	}
	cmps := []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(claimKey), "=", s.ClaimModRevision),
		Unchanged(HostAllocKey(s.Host), s.AllocModRevision),
	}
	ops := []clientv3.Op{clientv3.OpDelete(claimKey)}
	if s.Alloc != nil {
		next := addResources(s.Alloc, s.Claim.GetResources(), -1)
		b, err := proto.Marshal(next)
		if err != nil {
			return nil, nil, fmt.Errorf("encode allocation of host %s: %w", s.Host, err)
		}
		ops = append(ops, clientv3.OpPut(HostAllocKey(s.Host), string(b)))
	}
	return cmps, ops, nil
}

// addResources returns alloc + sign*r, never below zero (a negative
// allocation would only hide an inconsistency behind free capacity).
func addResources(alloc *minicloudv1.HostAllocation, r *minicloudv1.Resources, sign int64) *minicloudv1.HostAllocation {
	cur := alloc.GetAllocated()
	next := &minicloudv1.HostAllocation{
		Allocated: &minicloudv1.Resources{
			Vcpus:     int32(max(0, int64(cur.GetVcpus())+sign*int64(r.GetVcpus()))),
			MemoryMib: max(0, cur.GetMemoryMib()+sign*r.GetMemoryMib()),
			DiskGib:   max(0, cur.GetDiskGib()+sign*r.GetDiskGib()),
		},
		VmCount: int32(max(0, int64(alloc.GetVmCount())+sign)),
	}
	return next
}
