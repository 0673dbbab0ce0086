package store

import (
	"context"
	"math/rand/v2"
	"strconv"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// VNIRange bounds the VXLAN segment ids the API hands to networks: one per
// network, so it is also the bound on the number of networks.
type VNIRange struct {
	First, Last uint32
}

// DefaultVNIRange leaves VNIs below 4096 to anything else sharing the
// underlay (they are commonly mapped 1:1 to VLAN ids) and allows 61,440
// networks.
var DefaultVNIRange = VNIRange{First: 4096, Last: 65535}

// maxVNI is the largest 24-bit VNI.
const maxVNI = 1<<24 - 1

// Validate checks the range.
func (r VNIRange) Validate() error {
	if r.First == 0 || r.Last > maxVNI || r.First > r.Last {
		return errdefs.Invalid("VNI range %d-%d: want 1 <= first <= last <= %d", r.First, r.Last, maxVNI)
	}
	return nil
}

// VNIAllocation picks a free VNI of r for network networkID and returns
// what to commit in the same transaction as the network's creation: the
// compare that the VNI is still free and the op that takes it. A failed
// transaction means someone else took it (or the network list changed):
// the caller reads again and retries. The pick starts at a random point of
// the range, so a VNI released a moment ago (a host may still be tearing
// down its tunnel) is unlikely to be handed out at once.
func VNIAllocation(ctx context.Context, kv clientv3.KV, r VNIRange, networkID string) (uint32, clientv3.Cmp, clientv3.Op, error) {
	if err := r.Validate(); err != nil {
		return 0, clientv3.Cmp{}, clientv3.Op{}, err
	}
	resp, err := kv.Get(ctx, VNIPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, clientv3.Cmp{}, clientv3.Op{}, errdefs.Wrap(errdefs.KindUnavailable, err, "etcd list %s", VNIPrefix)
	}
	used := make(map[uint32]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if v, err := strconv.ParseUint(LastSegment(string(kv.Key)), 10, 32); err == nil {
			used[uint32(v)] = true
		}
	}
	size := uint64(r.Last-r.First) + 1
	start := rand.Uint64N(size)
	for i := range size {
		vni := r.First + uint32((start+i)%size)
		if !used[vni] {
			return vni, Absent(VNIKey(vni)), clientv3.OpPut(VNIKey(vni), networkID), nil
		}
	}
	return 0, clientv3.Cmp{}, clientv3.Op{}, errdefs.ResourceExhausted(
		"all %d VXLAN segment ids (%d-%d) are taken: delete an unused network first", size, r.First, r.Last)
}

// VNIRelease returns the op that frees vni, to commit with the deletion of
// the network that owns it. It is a no-op for vni 0 (a network made before
// VNIs existed).
func VNIRelease(vni uint32) []clientv3.Op {
	if vni == 0 {
		return nil
	}
	return []clientv3.Op{clientv3.OpDelete(VNIKey(vni))}
}
