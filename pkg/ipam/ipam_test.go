package ipam_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/ipam"
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

func TestLowestFreeSkipsNetworkGatewayBroadcast(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	a := ipam.New(cli)
	n := network("10.0.0.0/29", "10.0.0.1") // usable .2-.6
	var got []string
	for i := range 5 {
		ip, err := allocate(t, ctx, cli, a, n, fmt.Sprintf("vm-%d", i))
		if err != nil {
			t.Fatalf("allocate %d: %v", i, err)
		}
		got = append(got, ip.String())
	}
	want := []string{"10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("allocated %v, want %v", got, want)
	}
	if _, err := allocate(t, ctx, cli, a, n, "vm-x"); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("allocate on a full network: %v, want ResourceExhausted", err)
	}
	if _, err := cli.Delete(ctx, store.IPAMKey("net-1", "10.0.0.4")); err != nil {
		t.Fatal(err)
	}
	ip, err := allocate(t, ctx, cli, a, n, "vm-y")
	if err != nil || ip.String() != "10.0.0.4" {
		t.Fatalf("after release got %v, %v; want 10.0.0.4", ip, err)
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
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	n := network("10.1.0.0/27", "10.1.0.1") // 29 usable
	allocators := []*ipam.Allocator{ipam.New(cli), ipam.New(cli)}
	const vms = 40
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		owner     = map[netip.Addr]string{}
		exhausted int
	)
	for i := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("vm-%02d", i)
			ip, err := allocate(t, ctx, cli, allocators[i%2], n, id)
			mu.Lock()
			defer mu.Unlock()
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
		}()
	}
	wg.Wait()
	if len(owner) != 29 || exhausted != vms-29 {
		t.Fatalf("%d allocated, %d exhausted; want 29 and %d", len(owner), exhausted, vms-29)
	}
	resp, err := cli.Get(ctx, store.IPAMNetworkPrefix("net-1"), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		ip := netip.MustParseAddr(store.LastSegment(string(kv.Key)))
		if owner[ip] != string(kv.Value) {
			t.Errorf("etcd says %s is %s's, allocator returned it to %s", ip, kv.Value, owner[ip])
		}
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
// skipped by later picks of the same allocator and freed by Done(false).
func TestReservationsInOneProcessDoNotCollide(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	a := ipam.New(cli)
	n := network("10.2.0.0/29", "10.2.0.1")
	r1, err := a.Reserve(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := a.Reserve(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	if r1.Addr == r2.Addr {
		t.Fatalf("two reservations of %s", r1.Addr)
	}
	r1.Done(false)
	r3, err := a.Reserve(ctx, n)
	if err != nil || r3.Addr != r1.Addr {
		t.Fatalf("after an aborted reservation got %v, %v; want %s again", r3.Addr, err, r1.Addr)
	}
	// A committed reservation is found in etcd by the next read.
	if _, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{store.Absent(store.IPAMKey(r2.NetworkID, r2.Addr.String()))}, []clientv3.Op{clientv3.OpPut(store.IPAMKey(r2.NetworkID, r2.Addr.String()), "vm-2")}); err != nil || !ok {
		t.Fatalf("commit: %v %v", ok, err)
	}
	r2.Done(true)
	r3.Done(false)
	r4, err := a.Reserve(ctx, n)
	if err != nil || r4.Addr != r1.Addr {
		t.Fatalf("got %v, %v; want %s", r4.Addr, err, r1.Addr)
	}
	r5, err := a.Reserve(ctx, n)
	if err != nil || r5.Addr == r2.Addr || r5.Addr == r4.Addr {
		t.Fatalf("got %v, %v; want neither %s nor %s", r5.Addr, err, r2.Addr, r4.Addr)
	}
}
