package invariants

import (
	"context"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler"
)

// ReadCloud reads every VM (spec and status) and IPAM address at one etcd
// revision, and the claim invariants (scheduler.VerifyClaims, at its own).
func ReadCloud(ctx context.Context, kv clientv3.KV) (Cloud, error) {
	var reads store.Reads
	specs := reads.Get(store.VMSpecPrefix, clientv3.WithPrefix())
	statuses := reads.Get(store.VMStatusPrefix, clientv3.WithPrefix())
	ipam := reads.Get(store.IPAMPrefix, clientv3.WithPrefix())
	if err := reads.Do(ctx, kv); err != nil {
		return Cloud{}, fmt.Errorf("read VMs: %w", err)
	}
	specObjs, err := store.DecodeAll(specs.KVs(), func() *minicloudv1.VM { return &minicloudv1.VM{} })
	if err != nil {
		return Cloud{}, err
	}
	statusObjs, err := store.DecodeAll(statuses.KVs(), func() *minicloudv1.VMStatus { return &minicloudv1.VMStatus{} })
	if err != nil {
		return Cloud{}, err
	}
	st := map[string]*minicloudv1.VMStatus{}
	for _, o := range statusObjs {
		st[store.LastSegment(o.Key)] = o.Value
	}
	c := Cloud{VMs: map[string]VM{}}
	for _, o := range specObjs {
		id := store.LastSegment(o.Key)
		s := st[id]
		vm := VM{
			ID: id, Name: o.Value.GetMeta().GetName(), Project: o.Value.GetMeta().GetProject(),
			Host: s.GetHost(), Phase: s.GetPhase(), Reason: s.GetReason(), Message: s.GetMessage(),
			WantStopped: o.Value.GetSpec().GetPowerState() == minicloudv1.PowerState_POWER_STATE_STOPPED,
		}
		for _, a := range s.GetAddresses() {
			vm.Addresses = append(vm.Addresses, Address{Network: a.GetNetwork(), IP: a.GetIp(), MAC: a.GetMac()})
		}
		c.VMs[id] = vm
	}
	for _, kv := range ipam.KVs() {
		network, ip, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), store.IPAMPrefix), "/")
		if !ok {
			return Cloud{}, fmt.Errorf("ipam key %q: want ipam/<network id>/<ip>", kv.Key)
		}
		c.IPAM = append(c.IPAM, IPAMEntry{Network: network, IP: ip, VMID: string(kv.Value)})
	}
	if c.ClaimProblems, err = scheduler.VerifyClaims(ctx, kv); err != nil {
		return Cloud{}, err
	}
	return c, nil
}
