package scheduler

import (
	"context"
	"fmt"
	"sort"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

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
	resp, err := kv.Txn(ctx).Then(
		clientv3.OpGet(store.HostSpecPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(store.HostAllocPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(store.ClaimPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(store.VMStatusPrefix, clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("read claims: %w", err)
	}
	var out []string
	bad := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	hosts := map[string]*minicloudv1.Host{}
	for _, kv := range resp.Responses[0].GetResponseRange().GetKvs() {
		h := &minicloudv1.Host{}
		if err := proto.Unmarshal(kv.Value, h); err != nil {
			return nil, fmt.Errorf("decode %s: %w", kv.Key, err)
		}
		hosts[store.LastSegment(string(kv.Key))] = h
	}
	allocs := map[string]placement.Resources{}
	counts := map[string]int{}
	for _, kv := range resp.Responses[1].GetResponseRange().GetKvs() {
		a := &minicloudv1.HostAllocation{}
		if err := proto.Unmarshal(kv.Value, a); err != nil {
			return nil, fmt.Errorf("decode %s: %w", kv.Key, err)
		}
		name := store.LastSegment(string(kv.Key))
		allocs[name] = placement.ResourcesFromProto(a.GetAllocated())
		counts[name] = int(a.GetVmCount())
	}
	statuses := map[string]*minicloudv1.VMStatus{}
	for _, kv := range resp.Responses[3].GetResponseRange().GetKvs() {
		st := &minicloudv1.VMStatus{}
		if err := proto.Unmarshal(kv.Value, st); err != nil {
			return nil, fmt.Errorf("decode %s: %w", kv.Key, err)
		}
		statuses[store.LastSegment(string(kv.Key))] = st
	}
	sums := map[string]placement.Resources{}
	sumCounts := map[string]int{}
	claimed := map[string]string{} // vm -> host
	for _, kv := range resp.Responses[2].GetResponseRange().GetKvs() {
		c := &minicloudv1.Claim{}
		if err := proto.Unmarshal(kv.Value, c); err != nil {
			return nil, fmt.Errorf("decode %s: %w", kv.Key, err)
		}
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
			bad("claim %s: vm %s has no status", kv.Key, vm)
		case st.GetHost() != host:
			bad("claim %s: vm %s is on host %q", kv.Key, vm, st.GetHost())
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
