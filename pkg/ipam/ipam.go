// Package ipam picks the IPv4 addresses of minicloud networks. An
// allocation is the key ipam/<network-id>/<ip> holding the VM id, written
// by the VM's create transaction (store.CreateVMTxn) under the compare "key
// absent", so two VMs can never hold one address even with several API
// servers; a lost race is a failed compare and the caller retries with a
// fresh pick. store.RemoveVMTxn releases a VM's addresses with the VM.
package ipam

import (
	"context"
	"crypto/sha256"
	"fmt"
	"math"
	"net/netip"
	"sync"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// Allocator picks the lowest free address of a network. Addresses picked
// in this process stay reserved in memory while their transaction runs, and
// after it commits until no read of the addresses that began before the
// commit is still running (such a read cannot see them in etcd), so that
// concurrent creates in one API server pick different addresses instead of
// losing compares to each other. Across API servers the etcd compare alone
// keeps addresses unique.
type Allocator struct {
	kv       clientv3.KV
	mu       sync.Mutex
	gen      uint64                           // bumped by every commit
	reading  map[uint64]int                   // generation at start of each running read → count
	reserved map[string]map[netip.Addr]uint64 // network id → address → generation of its commit
}

// inFlight marks a reservation whose transaction has not finished.
const inFlight = math.MaxUint64

// New returns an allocator over kv.
func New(kv clientv3.KV) *Allocator {
	return &Allocator{kv: kv, reading: map[uint64]int{}, reserved: map[string]map[netip.Addr]uint64{}}
}

// Reservation is an address picked for a VM but not yet committed. The
// transaction that creates the VM (store.CreateVMTxn) writes it under the
// compare "key absent"; then call Done.
type Reservation struct {
	NetworkID string
	Addr      netip.Addr
	Prefix    netip.Prefix
	Gateway   netip.Addr
	a         *Allocator
}

// Done ends the reservation once the transaction has finished, telling
// whether it committed the address.
func (r *Reservation) Done(committed bool) {
	a := r.a
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.reserved[r.NetworkID]
	if committed && m != nil {
		m[r.Addr] = a.gen
		a.gen++
		return
	}
	delete(m, r.Addr)
	if len(m) == 0 {
		delete(a.reserved, r.NetworkID)
	}
}

// Reserve picks the lowest address of network that is neither the network
// address, the gateway nor the broadcast address, not stored in etcd and
// not reserved in this process.
func (a *Allocator) Reserve(ctx context.Context, network *minicloudv1.Network) (*Reservation, error) {
	rd := a.BeginRead()
	defer rd.End()
	resp, err := a.kv.Do(ctx, UsedOp(network.GetMeta().GetId()))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "read addresses of network %s", network.GetMeta().GetName())
	}
	return rd.Reserve(network, resp.Get().Kvs)
}

// Read is a read of networks' addresses that a caller folds into its own
// etcd read (to save a round trip): BeginRead, then the caller's read with
// UsedOp for each network, then Reserve from what it returned, then End.
type Read struct {
	a        *Allocator
	startGen uint64
	ended    bool
}

// BeginRead starts a read; call it before the etcd read it stands for.
func (a *Allocator) BeginRead() *Read {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reading[a.gen]++
	return &Read{a: a, startGen: a.gen}
}

// End finishes the read. It is safe to call twice.
func (rd *Read) End() {
	a := rd.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if rd.ended {
		return
	}
	rd.ended = true
	if a.reading[rd.startGen]--; a.reading[rd.startGen] == 0 {
		delete(a.reading, rd.startGen)
	}
}

// UsedOp reads the addresses in use on a network (keys only).
func UsedOp(networkID string) clientv3.Op {
	return clientv3.OpGet(store.IPAMNetworkPrefix(networkID), clientv3.WithPrefix(), clientv3.WithKeysOnly())
}

// Reserve picks the lowest free address of network given used, the result
// of UsedOp in the read this Read stands for.
func (rd *Read) Reserve(network *minicloudv1.Network, used []*mvccpb.KeyValue) (*Reservation, error) {
	prefix, gateway, err := Parse(network)
	if err != nil {
		return nil, err
	}
	id := network.GetMeta().GetId()
	taken := make(map[netip.Addr]struct{}, len(used))
	for _, kv := range used {
		if ip, err := netip.ParseAddr(store.LastSegment(string(kv.Key))); err == nil {
			taken[ip] = struct{}{}
		}
	}
	a := rd.a
	a.mu.Lock()
	defer a.mu.Unlock()
	// Commits older than every running read are in etcd for all readers.
	oldest := rd.startGen
	for g := range a.reading {
		oldest = min(oldest, g)
	}
	reserved := a.reserved[id]
	for ip, g := range reserved {
		if g < oldest {
			delete(reserved, ip)
		}
	}
	broadcast := Broadcast(prefix)
	for ip := prefix.Addr().Next(); ip.IsValid() && ip.Less(broadcast); ip = ip.Next() {
		if ip == gateway {
			continue
		}
		if _, ok := taken[ip]; ok {
			continue
		}
		if _, ok := reserved[ip]; ok {
			continue
		}
		if reserved == nil {
			reserved = make(map[netip.Addr]uint64)
			a.reserved[id] = reserved
		}
		reserved[ip] = inFlight
		return &Reservation{NetworkID: id, Addr: ip, Prefix: prefix, Gateway: gateway, a: a}, nil
	}
	return nil, errdefs.ResourceExhausted("network %s (%s) has no free address: delete VMs on it or create a larger network",
		network.GetMeta().GetName(), prefix)
}

// Parse returns a network's prefix and gateway.
func Parse(network *minicloudv1.Network) (netip.Prefix, netip.Addr, error) {
	prefix, err := netip.ParsePrefix(network.GetCidr())
	if err != nil {
		return netip.Prefix{}, netip.Addr{}, errdefs.Invalid("network %s: cidr %q: %v", network.GetMeta().GetName(), network.GetCidr(), err)
	}
	gateway, err := netip.ParseAddr(network.GetGateway())
	if err != nil {
		return netip.Prefix{}, netip.Addr{}, errdefs.Invalid("network %s: gateway %q: %v", network.GetMeta().GetName(), network.GetGateway(), err)
	}
	return prefix.Masked(), gateway, nil
}

// Broadcast is the last address of an IPv4 prefix.
func Broadcast(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	hostBits := 32 - p.Bits()
	for i := 3; i >= 0 && hostBits > 0; i-- {
		n := min(hostBits, 8)
		a[i] |= byte(1<<n - 1)
		hostBits -= n
	}
	return netip.AddrFrom4(a)
}

// MAC derives a stable MAC address for a VM's interface on a network, in
// the OpenStack OUI fa:16:3e, so the same VM keeps its MAC across
// reschedules and agent restarts.
func MAC(vmID, networkID string) string {
	h := sha256.Sum256([]byte(vmID + "/" + networkID))
	return fmt.Sprintf("fa:16:3e:%02x:%02x:%02x", h[0], h[1], h[2])
}
