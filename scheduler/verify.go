package scheduler

import (
	"context"
	"fmt"
	"sort"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/placement"
)

// VerifyClaims reads hosts, allocations, claims and VM statuses at one
// revision and returns every violation of the claim invariants (nil if
// none):
//   - each hosts/alloc/<host> is the sum of the claims under claims/<host>/;
//   - no host is allocated beyond its capacity times its allocation ratio;
//   - every claim belongs to an existing VM whose status names that host;
//   - every VM in phase SCHEDULED has a claim on its host.
//
// The tests and hack/schedbench use it; an operator can too (it only reads).
func VerifyClaims(ctx context.Context, kv clientv3.KV) ([]string, error) {
	var reads store.Reads
	hostKVs := reads.Get(store.HostSpecPrefix, clientv3.WithPrefix())
	allocKVs := reads.Get(store.HostAllocPrefix, clientv3.WithPrefix())
	claimKVs := reads.Get(store.ClaimPrefix, clientv3.WithPrefix())
	statusKVs := reads.Get(store.VMStatusPrefix, clientv3.WithPrefix())
	if err := reads.Do(ctx, kv); err != nil {
		return nil, fmt.Errorf("read claims: %w", err)
	}
	var out []string
	bad := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	hostObjs, err := store.DecodeAll(hostKVs.KVs(), func() *minicloudv1.Host { return &minicloudv1.Host{} })
	if err != nil {
		return nil, err
	}
	hosts := map[string]*minicloudv1.Host{}
	for _, h := range hostObjs {
		hosts[store.LastSegment(h.Key)] = h.Value
	}
	allocObjs, err := store.DecodeAll(allocKVs.KVs(), func() *minicloudv1.HostAllocation { return &minicloudv1.HostAllocation{} })
	if err != nil {
		return nil, err
	}
	allocs := map[string]placement.Resources{}
	counts := map[string]int{}
	for _, a := range allocObjs {
		name := store.LastSegment(a.Key)
		allocs[name] = placement.ResourcesFromProto(a.Value.GetAllocated())
		counts[name] = int(a.Value.GetVmCount())
	}
	statusObjs, err := store.DecodeAll(statusKVs.KVs(), func() *minicloudv1.VMStatus { return &minicloudv1.VMStatus{} })
	if err != nil {
		return nil, err
	}
	statuses := map[string]*minicloudv1.VMStatus{}
	for _, st := range statusObjs {
		statuses[store.LastSegment(st.Key)] = st.Value
	}
	claims, err := store.DecodeAll(claimKVs.KVs(), func() *minicloudv1.Claim { return &minicloudv1.Claim{} })
	if err != nil {
		return nil, err
	}
	sums := map[string]placement.Resources{}
	sumCounts := map[string]int{}
	claimed := map[string]string{} // vm -> host
	for _, obj := range claims {
		c, key := obj.Value, obj.Key
		host, vm := c.GetHost(), c.GetVmId()
		sums[host] = sums[host].Add(placement.ResourcesFromProto(c.GetResources()))
		sumCounts[host]++
		if other, ok := claimed[vm]; ok {
			bad("vm %s has claims on %s and %s", vm, other, host)
		}
		claimed[vm] = host
		st, ok := statuses[vm]
		switch {
		case !ok:
			bad("claim %s: vm %s has no status", key, vm)
		case st.GetHost() != host:
			bad("claim %s: vm %s is on host %q", key, vm, st.GetHost())
		}
	}
	names := map[string]bool{}
	for h := range allocs {
		names[h] = true
	}
	for h := range sums {
		names[h] = true
	}
	sorted := make([]string, 0, len(names))
	for h := range names {
		sorted = append(sorted, h)
	}
	sort.Strings(sorted)
	for _, h := range sorted {
		if allocs[h] != sums[h] || counts[h] != sumCounts[h] {
			bad("host %s: allocation %+v (%d vms) != sum of claims %+v (%d vms)", h, allocs[h], counts[h], sums[h], sumCounts[h])
		}
		spec, ok := hosts[h]
		if !ok {
			bad("host %s: allocation without a registered host", h)
			continue
		}
		ph := placement.Host{Capacity: placement.ResourcesFromProto(spec.GetCapacity()), Ratios: placement.RatiosFromProto(spec.GetAllocationRatios()), Allocated: allocs[h]}
		if f := ph.Free(); f.VCPUs < 0 || f.MemoryMiB < 0 || f.DiskGiB < 0 {
			bad("host %s: allocated %+v exceeds limits %+v", h, ph.Allocated, ph.Limits())
		}
	}
	for id, st := range statuses {
		if st.GetPhase() == lifecycle.Scheduled && claimed[id] != st.GetHost() {
			bad("vm %s: SCHEDULED on %q without a claim there", id, st.GetHost())
		}
	}
	return out, nil
}
