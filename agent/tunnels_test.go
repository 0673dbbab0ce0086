package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// peerRecorder is a GuestServices whose PeerDirectory records the last set.
type peerRecorder struct {
	GuestServices
	mu    sync.Mutex
	ports []*minicloudv1.NetworkPort
}

func (p *peerRecorder) SetNetworkPorts(_ context.Context, ports []*minicloudv1.NetworkPort) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ports = ports
	return nil
}

func (p *peerRecorder) names() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, x := range p.ports {
		out = append(out, x.GetHostname())
	}
	return out
}

// TestTunnelFollowsNetworkPorts runs the agent's stream follower against a
// real API server over embedded etcd, with the fake network adapter (held
// to the same conformance suite as the real one): the tunnel of the host's
// network is programmed with the other host's port, never with the host's
// own, and follows the set as VMs come and go; DNS gets every VM's name.
func TestTunnelFollowsNetworkPorts(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	api, err := apiservertest.Listen(ctx, cli, apiserver.Config{ImageDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(api.Server.GRPCServer().Stop)
	conn, err := grpc.NewClient(api.Addr, api.DialOptions(api.AdminToken)...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Each host speaks as itself (its certificate); the admin makes the rest.
	hostClient := func(name string) minicloudv1.HostServiceClient {
		opts, err := api.HostDialOptions(name)
		if err != nil {
			t.Fatal(err)
		}
		c, err := grpc.NewClient(api.Addr, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return minicloudv1.NewHostServiceClient(c)
	}
	hosts := hostClient("h1")
	nets := minicloudv1.NewNetworkServiceClient(conn)
	vms := minicloudv1.NewVMServiceClient(conn)
	flavors := minicloudv1.NewFlavorServiceClient(conn)

	nw, err := nets.CreateNetwork(ctx, &minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.77.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := flavors.CreateFlavor(ctx, &minicloudv1.CreateFlavorRequest{Name: "tiny", Vcpus: 1, MemoryMib: 64, DiskGib: 1}); err != nil {
		t.Fatal(err)
	}
	imgOp, _ := store.PutOp(store.ImageKey("img"), &minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Id: "img-id", Name: "img"},
		Format: minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2, Disk: &minicloudv1.ImageBlob{Sha256: strings.Repeat("0", 64), SizeBytes: 1}})
	if _, err := cli.Txn(ctx).Then(imgOp).Commit(); err != nil {
		t.Fatal(err)
	}
	for name, tip := range map[string]string{"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": ""} {
		if _, err := hostClient(name).RegisterHost(ctx, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
			Meta: &minicloudv1.ObjectMeta{Name: name}, Address: "127.0.0.1:1", TunnelIp: tip,
			Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 8192, DiskGib: 100}, Hypervisors: []string{"tcg"},
		}}); err != nil {
			t.Fatal(err)
		}
	}
	place := func(name, host string) *minicloudv1.VM {
		t.Helper()
		vm, err := vms.CreateVM(ctx, &minicloudv1.CreateVMRequest{Name: name, Spec: &minicloudv1.VMSpec{Image: "img", Flavor: "tiny"}})
		if err != nil {
			t.Fatal(err)
		}
		got, err := store.GetVM(ctx, cli, vm.Meta.Id)
		if err != nil {
			t.Fatal(err)
		}
		st := proto.CloneOf(got.Status)
		st.Host = host
		op, _ := store.VMStatusOp(vm.Meta.Id, st)
		if _, err := cli.Txn(ctx).Then(op).Commit(); err != nil {
			t.Fatal(err)
		}
		return got
	}
	a1 := place("a1", "h1")
	addr := a1.Status.Addresses[0]
	if addr.Vni != nw.Vni || addr.Vni == 0 || addr.DisableNat {
		t.Fatalf("address %v does not carry the network's VNI %d and NAT", addr, nw.Vni)
	}

	fake := networktest.NewFakeManager(networktest.NewFakeHost())
	guests := &peerRecorder{}
	a := &Agent{
		cfg:        Config{HostName: "h1", TunnelIP: netip.MustParseAddr("192.0.2.1"), UnderlayMTU: 1500},
		log:        slog.Default(),
		hosts:      hosts,
		net:        fake,
		guest:      guests,
		tunnels:    map[string]bool{},
		registered: make(chan struct{}),
	}
	close(a.registered)
	// What ensureNetwork does for a1's NIC.
	spec := network.BridgeSpec{Name: addr.Bridge, GatewayCIDR: netip.MustParsePrefix(addr.Gateway + "/24"), MTU: int(addr.Mtu), Tunnel: a.tunnelSpec(addr)}
	if spec.Tunnel == nil || spec.Tunnel.VNI != nw.Vni {
		t.Fatalf("tunnel spec %+v", spec.Tunnel)
	}
	if err := a.checkTunnelMTU(addr, int(addr.Mtu)); err != nil {
		t.Fatalf("MTU %d refused on a 1500-byte underlay: %v", addr.Mtu, err)
	}
	if err := a.checkTunnelMTU(addr, 1500); err == nil {
		t.Fatal("MTU 1500 accepted on a 1500-byte underlay")
	}
	if err := fake.EnsureBridge(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := a.applyRemotePorts(ctx, addr.Bridge); err != nil {
		t.Fatal(err)
	}
	go a.watchNetworkPorts(ctx)

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for !cond() {
			select {
			case <-ctx.Done():
				t.Fatalf("%s: never happened (remote %v, names %v)", what, fake.RemotePorts(addr.Bridge), guests.names())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	remoteIPs := func() []string {
		var out []string
		for _, p := range fake.RemotePorts(addr.Bridge) {
			out = append(out, p.IP.String()+"@"+p.VTEP.String())
		}
		slices.Sort(out)
		return out
	}
	waitFor("DNS learns a1", func() bool { return slices.Equal(guests.names(), []string{"a1"}) })
	if len(fake.RemotePorts(addr.Bridge)) != 0 {
		t.Fatalf("the host's own port was programmed as remote: %v", fake.RemotePorts(addr.Bridge))
	}
	b2 := place("b2", "h2")
	place("c3", "h3") // a host without a tunnel address: unreachable, not programmed
	want := []string{b2.Status.Addresses[0].Ip + "@192.0.2.2"}
	waitFor("the tunnel reaches b2 on h2", func() bool { return slices.Equal(remoteIPs(), want) })
	waitFor("DNS knows every VM of the network", func() bool {
		n := guests.names()
		slices.Sort(n)
		return slices.Equal(n, []string{"a1", "b2", "c3"})
	})
	if _, err := cli.Delete(ctx, store.VMStatusKey(b2.Meta.Id)); err != nil {
		t.Fatal(err)
	}
	waitFor("b2 leaves the tunnel", func() bool { return len(remoteIPs()) == 0 })
}
