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
	"encoding/binary"
	"fmt"
	"iter"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// Allocator picks a free address of a network at random. Addresses picked
// in this process stay reserved in memory while their transaction runs, and
// after it commits until no read of the addresses that began before the
// commit is still running (such a read cannot see them in etcd), so that
// concurrent creates in one API server pick different addresses instead of
// losing compares to each other. Across API servers the etcd compare alone
// keeps addresses unique.
type Allocator struct {
	kv       clientv3.KV
	mu       sync.Mutex
	gen      uint64                         // bumped by every commit
	reading  map[uint64]int                 // generation at start of each running read → count
	reserved map[string]map[netip.Addr]held // network id → address → its commit

	// The view: every allocated address, as an etcd watch of the IPAM
	// keys shows it at viewRev (0: no view), for ReserveFromView.
	view    map[string]map[uint32]bool // network id → addresses
	viewRev int64
}

// held is a reservation: the generation and revision of its commit
// (inFlight before it commits; rev 0 if unknown).
type held struct {
	gen uint64
	rev int64
}

// inFlight marks a reservation whose transaction has not finished.
const inFlight = math.MaxUint64

// New returns an allocator over kv.
func New(kv clientv3.KV) *Allocator {
	return &Allocator{kv: kv, reading: map[uint64]int{}, reserved: map[string]map[netip.Addr]held{}}
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
	if committed {
		r.DoneAt(0)
		return
	}
	r.DoneAt(-1)
}

// DoneAt ends the reservation once the transaction has finished: rev is
// the revision it committed at, 0 committed at an unknown revision, -1
// not committed. A commit's address stays reserved until the view has
// reached its revision, so that a pick from the view (ReserveFromView)
// does not take it in between.
func (r *Reservation) DoneAt(rev int64) {
	a := r.a
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.reserved[r.NetworkID]
	if rev >= 0 && m != nil {
		m[r.Addr] = held{gen: a.gen, rev: rev}
		a.gen++
		return
	}
	delete(m, r.Addr)
	if len(m) == 0 {
		delete(a.reserved, r.NetworkID)
	}
}

// Reserve picks a free address of network with reads of its own (see
// Read.Reserve).
func (a *Allocator) Reserve(ctx context.Context, network *minicloudv1.Network) (*Reservation, error) {
	rd := a.BeginRead()
	defer rd.End()
	return rd.Reserve(ctx, network, nil, nil)
}

// Read is one create's view of networks' addresses: BeginRead, then
// Probe a network, fold the probe's gets into the caller's own etcd read
// (to save a round trip), Reserve from what it returned, then End. The
// read's start orders it against this process's commits (see Allocator).
type Read struct {
	a        *Allocator
	startGen uint64
	ended    bool
}

// BeginRead starts a read; call it before the etcd reads it stands for.
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

// UsedOp reads the addresses in use on a network (keys only): the whole
// range, for the last resort of Reserve and for tools.
func UsedOp(networkID string) clientv3.Op {
	return clientv3.OpGet(store.IPAMNetworkPrefix(networkID), clientv3.WithPrefix(), clientv3.WithKeysOnly())
}

// Address allocation reads a bounded number of keys however full the
// network is, so a create costs the same at the first VM and at the
// 50,000th of a /16 (the whole range was read before, O(VMs) per create):
//
//  1. Probe: ProbeSize random candidate addresses, read as single keys in
//     the create's own read; the first absent one is taken. Below ~70 %
//     full nearly every create ends here.
//  2. Blocks: in a network larger than a /24, up to maxBlocks random /24
//     blocks are read (at most 256 keys each) and a free address of the
//     first block with one is taken.
//  3. Range: the whole range is read, so that a nearly full network still
//     fills to its last address and a full one is refused with
//     ResourceExhausted.
//
// Whatever was read, the create's transaction writes the address under
// the compare "key absent" (store.CreateVMTxn), so a pick that another API
// server took meanwhile is a failed compare and a retry, never a shared
// address. Random picks (as Neutron's reference IPAM driver makes among
// free addresses) also keep concurrent creates of several API servers from
// all racing for the lowest free address. A bitmap or free list kept in
// etcd would read less still, but every create would write the same few
// keys under a compare: the creates of several API servers would serialise
// on them, and they could drift from the IPAM keys that the delete and the
// consistency checks use.
const (
	ProbeSize = 8
	maxBlocks = 4
)

// space is the addresses of a network that VMs can have: all of the
// prefix but the network address, the gateway and the broadcast address.
type space struct {
	id             string
	prefix         netip.Prefix
	gateway        netip.Addr
	first, last    uint32 // the network and broadcast addresses
	gatewayN       uint32
	name           string
	cidr, gatewayS string
}

func newSpace(network *minicloudv1.Network) (space, error) {
	prefix, gateway, err := Parse(network)
	if err != nil {
		return space{}, err
	}
	if !prefix.Addr().Is4() || !gateway.Is4() {
		return space{}, errdefs.Invalid("network %s: only IPv4 networks have addresses allocated", network.GetMeta().GetName())
	}
	return space{
		id: network.GetMeta().GetId(), prefix: prefix, gateway: gateway,
		first: toN(prefix.Addr()), last: toN(Broadcast(prefix)), gatewayN: toN(gateway),
		name: network.GetMeta().GetName(), cidr: network.GetCidr(), gatewayS: network.GetGateway(),
	}, nil
}

func toN(a netip.Addr) uint32 { b := a.As4(); return binary.BigEndian.Uint32(b[:]) }

func fromN(n uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	return netip.AddrFrom4(b)
}

// usable says whether a VM may have address n.
func (s space) usable(n uint32) bool { return n > s.first && n < s.last && n != s.gatewayN }

// random is a uniformly random address strictly inside the prefix.
func (s space) random() uint32 { return s.first + 1 + rand.Uint32N(s.last-s.first-1) }

func (s space) key(n uint32) string { return store.IPAMKey(s.id, fromN(n).String()) }

// Probe is a few random addresses of one network whose keys the caller
// reads, count only, in its own read.
type Probe struct {
	s     space
	addrs []uint32
}

// Probe picks random candidate addresses of network, skipping those this
// process has reserved.
func (rd *Read) Probe(network *minicloudv1.Network) (*Probe, error) {
	s, err := newSpace(network)
	if err != nil {
		return nil, err
	}
	return rd.probe(s), nil
}

func (rd *Read) probe(s space) *Probe {
	p := &Probe{s: s}
	a := rd.a
	a.mu.Lock()
	defer a.mu.Unlock()
	reserved := a.reserved[s.id]
	// Bounded tries: a small network has fewer free candidates than
	// ProbeSize.
	for range 4 * ProbeSize {
		if len(p.addrs) == ProbeSize {
			break
		}
		n := s.random()
		if !s.usable(n) || slices.Contains(p.addrs, n) {
			continue
		}
		if _, ok := reserved[fromN(n)]; ok {
			continue
		}
		p.addrs = append(p.addrs, n)
	}
	return p
}

// Ops are the probe's gets: one count-only get per candidate.
func (p *Probe) Ops() []clientv3.Op {
	ops := make([]clientv3.Op, len(p.addrs))
	for i, n := range p.addrs {
		ops[i] = clientv3.OpGet(p.s.key(n), clientv3.WithCountOnly())
	}
	return ops
}

// For says whether the probe was made for network as it is now (same id,
// cidr and gateway), so its result may be used for it.
func (p *Probe) For(network *minicloudv1.Network) bool {
	return p != nil && p.s.id == network.GetMeta().GetId() && p.s.cidr == network.GetCidr() && p.s.gatewayS == network.GetGateway()
}

// Reserve picks a free address of network that this process has not
// reserved: the first absent candidate of probe, whose i-th get of Ops
// found present[i] keys, else one found by the reads of steps 2 and 3
// above. probe may be nil or made for another version of the network;
// then Reserve probes with a read of its own.
func (rd *Read) Reserve(ctx context.Context, network *minicloudv1.Network, probe *Probe, present []int64) (*Reservation, error) {
	s, err := newSpace(network)
	if err != nil {
		return nil, err
	}
	if !probe.For(network) || len(present) != len(probe.addrs) {
		probe = rd.probe(s)
		resp, err := rd.a.kv.Txn(ctx).Then(probe.Ops()...).Commit()
		if err != nil {
			return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "read addresses of network %s", s.name)
		}
		present = make([]int64, len(resp.Responses))
		for i, r := range resp.Responses {
			present[i] = r.GetResponseRange().GetCount()
		}
	}
	for i, n := range probe.addrs {
		if present[i] == 0 {
			if r := rd.take(s, slices.Values([]uint32{n})); r != nil {
				return r, nil
			}
		}
	}
	if s.prefix.Bits() < 24 {
		for range maxBlocks {
			block := s.random() &^ 0xff
			a := fromN(block).As4()
			used, err := rd.used(ctx, s, fmt.Sprintf("%s%d.%d.%d.", store.IPAMNetworkPrefix(s.id), a[0], a[1], a[2]))
			if err != nil {
				return nil, err
			}
			if r := rd.take(s, free(s, block, block|0xff, used)); r != nil {
				return r, nil
			}
		}
	}
	used, err := rd.used(ctx, s, store.IPAMNetworkPrefix(s.id))
	if err != nil {
		return nil, err
	}
	if r := rd.take(s, free(s, s.first, s.last, used)); r != nil {
		return r, nil
	}
	return nil, errdefs.ResourceExhausted("network %s (%s) has no free address: delete VMs on it or create a larger network",
		s.name, s.prefix)
}

// used reads the allocated addresses under an IPAM key prefix.
func (rd *Read) used(ctx context.Context, s space, keyPrefix string) (map[uint32]bool, error) {
	resp, err := rd.a.kv.Get(ctx, keyPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "read addresses of network %s", s.name)
	}
	used := make(map[uint32]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if ip, err := netip.ParseAddr(store.LastSegment(string(kv.Key))); err == nil && ip.Is4() {
			used[toN(ip)] = true
		}
	}
	return used, nil
}

// free yields the usable addresses of [lo, hi] not in used, from a random
// one on (wrapping), so that concurrent picks spread.
func free(s space, lo, hi uint32, used map[uint32]bool) iter.Seq[uint32] {
	return func(yield func(uint32) bool) {
		lo, hi = max(lo, s.first), min(hi, s.last)
		size := hi - lo + 1
		start := rand.Uint32N(size)
		for i := range size {
			n := lo + (start+i)%size
			if s.usable(n) && !used[n] && !yield(n) {
				return
			}
		}
	}
}

// take reserves the first of candidates that this process has not
// reserved, or returns nil.
func (rd *Read) take(s space, candidates iter.Seq[uint32]) *Reservation {
	a := rd.a
	a.mu.Lock()
	defer a.mu.Unlock()
	// Commits older than every running read are in etcd for all readers.
	oldest := rd.startGen
	for g := range a.reading {
		oldest = min(oldest, g)
	}
	a.release(s.id, oldest)
	for n := range candidates {
		if r := a.hold(s, n); r != nil {
			return r
		}
	}
	return nil
}

// release drops the reservations of network id that every reader can
// see in etcd: committed before the oldest running read began (oldest),
// and, while there is a view, at or before the view's revision. Called
// with a.mu held.
func (a *Allocator) release(id string, oldest uint64) {
	reserved := a.reserved[id]
	for ip, h := range reserved {
		if h.gen < oldest && (a.viewRev == 0 || h.rev <= a.viewRev) {
			delete(reserved, ip)
		}
	}
}

// hold reserves address n of s unless this process holds it already.
// Called with a.mu held.
func (a *Allocator) hold(s space, n uint32) *Reservation {
	ip := fromN(n)
	reserved := a.reserved[s.id]
	if _, ok := reserved[ip]; ok {
		return nil
	}
	if reserved == nil {
		reserved = make(map[netip.Addr]held)
		a.reserved[s.id] = reserved
	}
	reserved[ip] = held{gen: inFlight}
	return &Reservation{NetworkID: s.id, Addr: ip, Prefix: s.prefix, Gateway: s.gateway, a: a}
}

// The view of allocated addresses lets a create pick its address with no
// etcd read: the API server's create cache (api/server/createcache.go)
// follows the IPAM keys with a watch and feeds them here. A pick from a
// view that is behind etcd is safe: the create's transaction still writes
// the address under "key absent", so an address taken meanwhile (at
// another API server) is a failed compare and a retry; this process's own
// commits stay reserved until the view shows them (DoneAt).

// SetView replaces the view with the IPAM keys of a list at rev.
func (a *Allocator) SetView(rev int64, keys [][]byte) {
	view := map[string]map[uint32]bool{}
	for _, k := range keys {
		if id, n, ok := parseKey(string(k)); ok {
			if view[id] == nil {
				view[id] = map[uint32]bool{}
			}
			view[id][n] = true
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.view, a.viewRev = view, rev
}

// ViewEvent is one change of an IPAM key the view follows.
type ViewEvent struct {
	Key     []byte
	Deleted bool
}

// UpdateView applies watched changes of IPAM keys and moves the view to
// rev.
func (a *Allocator) UpdateView(rev int64, events []ViewEvent) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.viewRev == 0 {
		return // dropped: the next SetView starts it again
	}
	for _, ev := range events {
		id, n, ok := parseKey(string(ev.Key))
		if !ok {
			continue
		}
		if ev.Deleted {
			delete(a.view[id], n)
			continue
		}
		if a.view[id] == nil {
			a.view[id] = map[uint32]bool{}
		}
		a.view[id][n] = true
	}
	a.viewRev = max(a.viewRev, rev)
}

// DropView forgets the view (its watch broke): ReserveFromView answers
// false until the next SetView.
func (a *Allocator) DropView() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.view, a.viewRev = nil, 0
}

// ReserveFromView picks a random address of network that the view shows
// free and this process has not reserved, with no etcd read. ok is false
// when there is no view or no free address turned up in a few random
// tries (a nearly full network): then reserve with a read (BeginRead).
func (a *Allocator) ReserveFromView(network *minicloudv1.Network) (r *Reservation, ok bool, err error) {
	s, err := newSpace(network)
	if err != nil {
		return nil, false, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.viewRev == 0 {
		return nil, false, nil
	}
	oldest := a.gen
	for g := range a.reading {
		oldest = min(oldest, g)
	}
	a.release(s.id, oldest)
	used := a.view[s.id]
	for range 4 * ProbeSize {
		if n := s.random(); s.usable(n) && !used[n] {
			if r := a.hold(s, n); r != nil {
				return r, true, nil
			}
		}
	}
	// Few free addresses: a small network is scanned whole; a large one
	// is left to the reads of Reserve (blocks, then the range).
	if s.last-s.first <= maxViewScan {
		for n := range free(s, s.first, s.last, used) {
			if r := a.hold(s, n); r != nil {
				return r, true, nil
			}
		}
	}
	return nil, false, nil
}

// maxViewScan is the largest network ReserveFromView scans address by
// address when its random picks found nothing.
const maxViewScan = 1024

// parseKey splits an IPAM key into its network id and IPv4 address.
func parseKey(key string) (id string, n uint32, ok bool) {
	rest, found := strings.CutPrefix(key, store.IPAMPrefix)
	if !found {
		return "", 0, false
	}
	id, addr, found := strings.Cut(rest, "/")
	if !found {
		return "", 0, false
	}
	ip, err := netip.ParseAddr(addr)
	if err != nil || !ip.Is4() {
		return "", 0, false
	}
	return id, toN(ip), true
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
