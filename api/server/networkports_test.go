package server_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func (e *env) registerTunnelHost(name, addr, tunnel string) {
	e.t.Helper()
	_, err := e.hosts.RegisterHost(ctx(e.t), &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: name}, Address: addr, TunnelIp: tunnel,
		Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 16384, DiskGib: 100}, Hypervisors: []string{"tcg"},
	}})
	if err != nil {
		e.t.Fatalf("register host %s: %v", name, err)
	}
}

// portsOf summarises a snapshot as "vmname@host(tunnel)" per port, sorted
// (the snapshot is in address order, and addresses are picked at random).
func portsOf(s *minicloudv1.NetworkPortsSnapshot) string {
	var out []string
	for _, p := range s.GetPorts() {
		out = append(out, p.GetVmName()+"@"+p.GetHost()+"("+p.GetTunnelIp()+")")
	}
	slices.Sort(out)
	return strings.Join(out, " ")
}

// TestWatchNetworkPorts: a host sees every port of the networks it has VMs
// on, its own and other hosts' (with their tunnel addresses), never those
// of other networks; each message is the whole set; a reconnect starts with
// the whole set again.
func TestWatchNetworkPorts(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	if _, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "other", Cidr: "10.98.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	e.registerTunnelHost("h1", "127.0.0.1:1", "192.0.2.1")
	e.registerTunnelHost("h2", "127.0.0.1:2", "192.0.2.2")
	_, err := e.hosts.RegisterHost(c, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: "h3"}, Address: "127.0.0.1:3", TunnelIp: "not-an-ip",
		Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 16384}, Hypervisors: []string{"tcg"},
	}})
	wantCode(t, err, codes.InvalidArgument, `tunnel_ip "not-an-ip"`)

	a := e.createVM("a")
	e.place(a.Meta.Id, "h1")

	sctx, cancel := context.WithTimeout(c, 30*time.Second)
	defer cancel()
	stream, err := e.hosts.WatchNetworkPorts(sctx, &minicloudv1.WatchNetworkPortsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	next := func(want string) *minicloudv1.NetworkPortsSnapshot {
		t.Helper()
		s, err := stream.Recv()
		if err != nil {
			t.Fatalf("recv (want %q): %v", want, err)
		}
		if got := portsOf(s); got != want {
			t.Fatalf("snapshot %q, want %q", got, want)
		}
		return s
	}
	first := next("a@h1(192.0.2.1)")
	p := first.Ports[0]
	if p.Vni == 0 || p.Bridge == "" || p.Mac == "" || p.Ip == "" || p.Network != "default" || p.Project != "default" {
		t.Fatalf("port %v lacks what the agent needs", p)
	}
	// A VM of another network on h2 changes nothing h1 sees: the next
	// message is the one for b, on h1's network.
	o := e.createVM("o", func(r *minicloudv1.CreateVMRequest) { r.Spec.Networks = []string{"other"} })
	e.place(o.Meta.Id, "h2")
	b := e.createVM("b")
	e.place(b.Meta.Id, "h2")
	next("a@h1(192.0.2.1) b@h2(192.0.2.2)")

	// A host moving its underlay address is seen too.
	e.registerTunnelHost("h2", "127.0.0.1:2", "192.0.2.22")
	next("a@h1(192.0.2.1) b@h2(192.0.2.22)")

	// Reconnecting gets the whole set first.
	again, err := e.hosts.WatchNetworkPorts(sctx, &minicloudv1.WatchNetworkPortsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := again.Recv()
	if err != nil || portsOf(s) != "a@h1(192.0.2.1) b@h2(192.0.2.22)" {
		t.Fatalf("after reconnect: %q %v", portsOf(s), err)
	}

	if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "b"}); err != nil {
		t.Fatal(err)
	}
	// b stays while its host still holds it (DELETING), so only its status
	// removal takes it out; deleting it from etcd directly plays that.
	if _, err := e.etcd.Delete(c, "/minicloud/vms/status/"+b.Meta.Id); err != nil {
		t.Fatal(err)
	}
	next("a@h1(192.0.2.1)")

	_, err = func() (*minicloudv1.NetworkPortsSnapshot, error) {
		st, err := e.hosts.WatchNetworkPorts(sctx, &minicloudv1.WatchNetworkPortsRequest{Host: "nope"})
		if err != nil {
			return nil, err
		}
		return st.Recv()
	}()
	wantCode(t, err, codes.NotFound, "host nope is not registered")
}
