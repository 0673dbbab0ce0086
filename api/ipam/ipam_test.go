package ipam_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/api/ipam"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

func network(cidr, gw string) *minicloudv1.Network {
	return &minicloudv1.Network{Meta: &minicloudv1.ObjectMeta{Id: "net-1", Name: "default"}, Cidr: cidr, Gateway: gw}
}

// allocate reserves an address for vmID and commits it as a VM's create
// does (store.CreateVMTxn: the IPAM key, under "absent"), retrying lost
// races.
func allocate(t *testing.T, ctx context.Context, kv clientv3.KV, a *ipam.Allocator, n *minicloudv1.Network, vmID string) (netip.Addr, error) {
	t.Helper()
	for range 64 {
		r, err := a.Reserve(ctx, n)
		if err != nil {
			return netip.Addr{}, err
		}
		key := store.IPAMKey(r.NetworkID, r.Addr.String())
		_, ok, err := store.Commit(ctx, kv, []clientv3.Cmp{store.Absent(key)}, []clientv3.Op{clientv3.OpPut(key, vmID)})
		r.Done(ok)
		if err != nil {
			return netip.Addr{}, err
		}
		if ok {
			return r.Addr, nil
		}
	}
	return netip.Addr{}, errdefs.Conflict("allocate on network %s: lost 64 races", n.GetMeta().GetName())
}

// TestFillsToTheLastAddress allocates every address of a /24 one after
// the other: the random probes find most, the read of the range the last
// ones; none is the network, gateway or broadcast address, none is given
// twice, and the full network is refused with ResourceExhausted. A
// released address is the one found next.
func TestFillsToTheLastAddress(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	a := ipam.New(cli)
	n := network("10.0.0.0/24", "10.0.0.1") // usable .2-.254: 253
	prefix := netip.MustParsePrefix("10.0.0.0/24")
	seen := map[netip.Addr]bool{}
	for i := range 253 {
		ip, err := allocate(t, ctx, cli, a, n, fmt.Sprintf("vm-%d", i))
		if err != nil {
			t.Fatalf("allocate %d: %v", i, err)
		}
		if !prefix.Contains(ip) || ip.String() == "10.0.0.0" || ip.String() == "10.0.0.1" || ip.String() == "10.0.0.255" || seen[ip] {
			t.Fatalf("allocation %d got %s (given before: %v)", i, ip, seen[ip])
		}
		seen[ip] = true
	}
	_, err := allocate(t, ctx, cli, a, n, "vm-x")
	if !errdefs.IsResourceExhausted(err) || !strings.Contains(err.Error(), "network default (10.0.0.0/24) has no free address") {
		t.Fatalf("allocate on a full network: %v, want ResourceExhausted naming the network", err)
	}
	if _, err := cli.Delete(ctx, store.IPAMKey("net-1", "10.0.0.77")); err != nil {
		t.Fatal(err)
	}
	ip, err := allocate(t, ctx, cli, a, n, "vm-y")
	if err != nil || ip.String() != "10.0.0.77" {
		t.Fatalf("after release got %v, %v; want 10.0.0.77", ip, err)
	}
}

// fillExcept writes the IPAM key of every usable address of n except
// those of keep, as if VMs held them.
func fillExcept(t *testing.T, cli *clientv3.Client, n *minicloudv1.Network, keep ...string) {
	t.Helper()
	prefix := netip.MustParsePrefix(n.Cidr)
	var ops []clientv3.Op
	flush := func() {
		if _, err := cli.Txn(context.Background()).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
		ops = ops[:0]
	}
	for ip := prefix.Addr().Next(); prefix.Contains(ip) && ip != ipam.Broadcast(prefix); ip = ip.Next() {
		if ip.String() == n.Gateway || slices.Contains(keep, ip.String()) {
			continue
		}
		ops = append(ops, clientv3.OpPut(store.IPAMKey(n.Meta.Id, ip.String()), "filler"))
		if len(ops) == 128 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
}

// TestNearlyFullLargeNetworkFillsToTheLastAddress: in a /20 (16 blocks of
// 256) with 4 free addresses left in different blocks, random probes and
// random blocks mostly miss; the allocator still finds each of them, then
// refuses.
func TestNearlyFullLargeNetworkFillsToTheLastAddress(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	a := ipam.New(cli)
	n := network("10.4.0.0/20", "10.4.0.1")
	left := []string{"10.4.0.2", "10.4.3.200", "10.4.9.0", "10.4.15.254"}
	fillExcept(t, cli, n, left...)
	var got []string
	for i := range left {
		ip, err := allocate(t, ctx, cli, a, n, fmt.Sprintf("vm-%d", i))
		if err != nil {
			t.Fatalf("allocate %d of the %d left: %v", i, len(left), err)
		}
		got = append(got, ip.String())
	}
	slices.Sort(got)
	want := slices.Clone(left)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("allocated %v, want the free %v", got, want)
	}
	if _, err := allocate(t, ctx, cli, a, n, "vm-x"); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("allocate on the full /20: %v, want ResourceExhausted", err)
	}
}

// TestProbeInTheCallersRead folds a probe into a read of the caller's, as
// a create does, and checks that Reserve takes an absent candidate; a
// probe made for another version of the network (another cidr) is not
// used for it.
func TestProbeInTheCallersRead(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	a := ipam.New(cli)
	old := network("10.5.0.0/24", "10.5.0.1")
	fillExcept(t, cli, old, "10.5.0.9")
	for range 20 {
		rd := a.BeginRead()
		p, err := rd.Probe(old)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := cli.Txn(ctx).Then(p.Ops()...).Commit()
		if err != nil {
			t.Fatal(err)
		}
		present := make([]int64, len(resp.Responses))
		for i, r := range resp.Responses {
			present[i] = r.GetResponseRange().GetCount()
		}
		r, err := rd.Reserve(ctx, old, p, present)
		rd.End()
		if err != nil || r.Addr.String() != "10.5.0.9" {
			t.Fatalf("reserve with a folded probe: %v, %v; want the one free address 10.5.0.9", r, err)
		}
		r.Done(false)
	}
	rd := a.BeginRead()
	defer rd.End()
	p, err := rd.Probe(old)
	if err != nil {
		t.Fatal(err)
	}
	renumbered := network("10.6.0.0/24", "10.6.0.1")
	if p.For(renumbered) {
		t.Fatal("a probe of 10.5.0.0/24 is taken for 10.6.0.0/24")
	}
	r, err := rd.Reserve(ctx, renumbered, p, make([]int64, len(p.Ops())))
	if err != nil || !netip.MustParsePrefix("10.6.0.0/24").Contains(r.Addr) {
		t.Fatalf("reserve on the renumbered network: %v, %v", r, err)
	}
}

func TestGatewayInTheMiddleIsSkipped(t *testing.T) {
	_, cli := etcdtest.Start(t)
	a := ipam.New(cli)
	n := network("10.0.0.0/30", "10.0.0.1") // only .2 usable
	ip, err := allocate(t, context.Background(), cli, a, n, "vm")
	if err != nil || ip.String() != "10.0.0.2" {
		t.Fatalf("got %v, %v; want 10.0.0.2", ip, err)
	}
}

// TestConcurrentAllocationsNeverShareAnAddress races more VMs than there are
// addresses through two allocators (two API servers) on one etcd.
func TestConcurrentAllocationsNeverShareAnAddress(t *testing.T) {
	for _, tc := range []struct {
		cidr, gw string
		usable   int
	}{{"10.1.0.0/27", "10.1.0.1", 29}, {"10.1.0.0/24", "10.1.0.1", 253}} {
		t.Run(tc.cidr, func(t *testing.T) {
			_, cli := etcdtest.Start(t)
			ctx := context.Background()
			n := network(tc.cidr, tc.gw)
			allocators := []*ipam.Allocator{ipam.New(cli), ipam.New(cli)}
			vms := tc.usable + 11
			var (
				wg        sync.WaitGroup
				mu        sync.Mutex
				owner     = map[netip.Addr]string{}
				exhausted int
				next      = make(chan int, vms)
			)
			for i := range vms {
				next <- i
			}
			close(next)
			for w := range 32 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range next {
						id := fmt.Sprintf("vm-%03d", i)
						ip, err := allocate(t, ctx, cli, allocators[w%2], n, id)
						mu.Lock()
						switch {
						case errdefs.IsResourceExhausted(err):
							exhausted++
						case err != nil:
							t.Errorf("allocate %s: %v", id, err)
						default:
							if prev, dup := owner[ip]; dup {
								t.Errorf("%s given to both %s and %s", ip, prev, id)
							}
							owner[ip] = id
						}
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			if len(owner) != tc.usable || exhausted != vms-tc.usable {
				t.Fatalf("%d allocated, %d exhausted; want %d and %d", len(owner), exhausted, tc.usable, vms-tc.usable)
			}
			resp, err := cli.Get(ctx, store.IPAMNetworkPrefix("net-1"), clientv3.WithPrefix())
			if err != nil {
				t.Fatal(err)
			}
			if len(resp.Kvs) != tc.usable {
				t.Errorf("%d IPAM keys, want %d", len(resp.Kvs), tc.usable)
			}
			for _, kv := range resp.Kvs {
				ip := netip.MustParseAddr(store.LastSegment(string(kv.Key)))
				if owner[ip] != string(kv.Value) {
					t.Errorf("etcd says %s is %s's, allocator returned it to %s", ip, kv.Value, owner[ip])
				}
			}
		})
	}
}

func TestBroadcastAndMAC(t *testing.T) {
	for cidr, want := range map[string]string{"10.0.0.0/24": "10.0.0.255", "10.0.0.0/20": "10.0.15.255", "192.168.1.128/25": "192.168.1.255"} {
		if got := ipam.Broadcast(netip.MustParsePrefix(cidr)).String(); got != want {
			t.Errorf("Broadcast(%s) = %s, want %s", cidr, got, want)
		}
	}
	m1, m2 := ipam.MAC("vm-a", "net-1"), ipam.MAC("vm-a", "net-2")
	if m1 == m2 || m1 != ipam.MAC("vm-a", "net-1") || len(m1) != 17 || m1[:9] != "fa:16:3e:" {
		t.Fatalf("MACs %s %s: want stable, distinct per network, fa:16:3e prefix", m1, m2)
	}
}

// TestReservationsInOneProcessDoNotCollide: picks not yet committed are
// skipped by later picks of the same allocator and freed by Done(false);
// a committed pick is never given again.
func TestReservationsInOneProcessDoNotCollide(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	a := ipam.New(cli)
	n := network("10.2.0.0/29", "10.2.0.1") // usable .2-.6
	var rs []*ipam.Reservation
	seen := map[netip.Addr]bool{}
	for range 5 {
		r, err := a.Reserve(ctx, n)
		if err != nil || seen[r.Addr] {
			t.Fatalf("reserve: %v, %v (reserved before: %v)", r, err, r != nil && seen[r.Addr])
		}
		seen[r.Addr] = true
		rs = append(rs, r)
	}
	if _, err := a.Reserve(ctx, n); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("a sixth reservation: %v, want ResourceExhausted", err)
	}
	rs[3].Done(false)
	r, err := a.Reserve(ctx, n)
	if err != nil || r.Addr != rs[3].Addr {
		t.Fatalf("after an aborted reservation got %v, %v; want %s again", r, err, rs[3].Addr)
	}
	// A committed reservation is found in etcd by the next read.
	committed := rs[1]
	key := store.IPAMKey(committed.NetworkID, committed.Addr.String())
	if _, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{store.Absent(key)}, []clientv3.Op{clientv3.OpPut(key, "vm-2")}); err != nil || !ok {
		t.Fatalf("commit: %v %v", ok, err)
	}
	committed.Done(true)
	r.Done(false)
	for i, r := range rs {
		if i != 1 && i != 3 { // 3 was done above
			r.Done(false)
		}
	}
	for range 4 {
		r, err := a.Reserve(ctx, n)
		if err != nil || r.Addr == committed.Addr {
			t.Fatalf("got %v, %v; want an address other than the committed %s", r, err, committed.Addr)
		}
	}
	if _, err := a.Reserve(ctx, n); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("with 4 reserved and 1 committed: %v, want ResourceExhausted", err)
	}
}

// TestReserveFromView: picks from the watched view of allocated addresses
// never take an address the view shows in use or one this process holds;
// a commit's address stays held until the view has reached the commit's
// revision; without a view there is no pick (the caller reads etcd).
func TestReserveFromView(t *testing.T) {
	a := ipam.New(nil) // picks from the view read no etcd
	n := network("10.0.0.0/29", "10.0.0.1")
	if _, ok, err := a.ReserveFromView(n); ok || err != nil {
		t.Fatalf("a pick with no view: ok %v, err %v", ok, err)
	}
	// .2-.6 usable; the view has .2, .3 and .5 in use.
	var keys [][]byte
	for _, ip := range []string{"10.0.0.2", "10.0.0.3", "10.0.0.5"} {
		keys = append(keys, []byte(store.IPAMKey("net-1", ip)))
	}
	a.SetView(10, keys)
	free := map[string]bool{"10.0.0.4": true, "10.0.0.6": true}
	r1 := mustPick(t, a, n, free)
	// r1 commits at revision 12: held until the view shows 12.
	r1.DoneAt(12)
	for range 20 {
		r := mustPick(t, a, n, free)
		if r.Addr == r1.Addr {
			t.Fatalf("picked %s, committed at 12, with the view at 10", r.Addr)
		}
		r.DoneAt(-1)
	}
	a.UpdateView(12, []ipam.ViewEvent{{Key: []byte(store.IPAMKey("net-1", r1.Addr.String()))}})
	delete(free, r1.Addr.String())
	for range 20 {
		mustPick(t, a, n, free).DoneAt(-1)
	}
	// The last free address taken (in flight): nothing left to pick.
	last := mustPick(t, a, n, free)
	if r, ok, _ := a.ReserveFromView(n); ok {
		t.Fatalf("picked %s with every address in use or held", r.Addr)
	}
	last.DoneAt(-1)
	// A delete in the view frees .3.
	a.UpdateView(13, []ipam.ViewEvent{{Key: []byte(store.IPAMKey("net-1", "10.0.0.3")), Deleted: true}})
	free["10.0.0.3"] = true
	mustPick(t, a, n, free).DoneAt(-1)
	a.DropView()
	if _, ok, _ := a.ReserveFromView(n); ok {
		t.Fatal("a pick after the view was dropped")
	}
}

// mustPick picks from a's view and fails unless the address is in free.
func mustPick(t *testing.T, a *ipam.Allocator, n *minicloudv1.Network, free map[string]bool) *ipam.Reservation {
	t.Helper()
	r, ok, err := a.ReserveFromView(n)
	if err != nil || !ok {
		t.Fatalf("pick from view: ok %v, err %v", ok, err)
	}
	if !free[r.Addr.String()] {
		t.Fatalf("picked %s, not one of the free %v", r.Addr, free)
	}
	return r
}
