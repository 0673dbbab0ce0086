package linux

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestGuestsCannotReachManagementNetworks routes a guest through the host to
// another "hypervisor" (a namespace on the management network, where agents
// and etcd listen): with WithProtectedNets it gets nowhere there, while other
// destinations behind the same uplink stay reachable. Everything, host
// included, runs in namespaces of its own.
func TestGuestsCannotReachManagementNetworks(t *testing.T) {
	netnstest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	br, tap := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+br)
	other := netnstest.NewNS(t, "mco-"+br)
	mgmt := netip.MustParsePrefix("10.253.0.0/30") // host .1, other hypervisor .2
	public := netip.MustParseAddr("10.254.0.2")    // a non-management address of the other side
	m := &inNS{ns: host, m: New(WithProtectedNets(mgmt))}

	// Uplink between the host and the other side.
	up := "mcu" + br[3:]
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: up}, PeerName: up + "p",
		PeerNamespace: netlink.NsFd(int(other.Handle()))}); err != nil {
		t.Fatal(err)
	}
	l, err := netlink.LinkByName(up)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(l, int(host.Handle())); err != nil {
		t.Fatal(err)
	}
	configure := func(ns *netnstest.NS, ifname string, addrs []string, route func(idx int) *netlink.Route) {
		t.Helper()
		if err := ns.Do(func() error {
			l, err := netlink.LinkByName(ifname)
			if err != nil {
				return err
			}
			for _, a := range addrs {
				p := netip.MustParsePrefix(a)
				if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}); err != nil {
					return fmt.Errorf("%s: %w", a, err)
				}
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
			if route != nil {
				if err := netlink.RouteAdd(route(l.Attrs().Index)); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("configure %s in %s: %v", ifname, ns.Name, err)
		}
	}
	configure(host, up, []string{"10.253.0.1/30"}, func(idx int) *netlink.Route {
		return &netlink.Route{LinkIndex: idx, Dst: &net.IPNet{IP: public.AsSlice(), Mask: net.CIDRMask(32, 32)}, Gw: net.IP{10, 253, 0, 2}}
	})
	configure(other, up+"p", []string{"10.253.0.2/30", public.String() + "/32"}, nil)

	// The guest network on the host.
	bspec := network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.252.0.1/24"), NAT: true}
	if err := m.EnsureBridge(ctx, bspec); err != nil {
		t.Fatal(err)
	}
	g := netnstest.NewGuestIn(t, host, tap(0), nil)
	port := network.PortSpec{VMID: "vm-1", TapName: tap(0), Bridge: br, MAC: g.MAC, IP: netip.MustParseAddr("10.252.0.10"), Existing: true}
	if err := m.EnsurePort(ctx, port); err != nil {
		t.Fatal(err)
	}
	if err := g.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.SetAddr(netip.PrefixFrom(port.IP, 24), bspec.GatewayCIDR.Addr()); err != nil {
		t.Fatal(err)
	}

	// Listeners on the other side: its agent and etcd on the management
	// address, and a service on the public one (the control).
	listen := func(a netip.AddrPort) *net.TCPListener {
		var l *net.TCPListener
		if err := other.Do(func() (err error) {
			l, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(a))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	agent := listen(netip.AddrPortFrom(netip.MustParseAddr("10.253.0.2"), 8642))
	etcd := listen(netip.AddrPortFrom(netip.MustParseAddr("10.253.0.2"), 2379))
	control := listen(netip.AddrPortFrom(public, 9000))

	dl, _ := ctx.Deadline()
	_ = control.SetDeadline(dl)
	// Warm the path first (neighbour entries, routes): a first SYN parked
	// behind ARP resolution could otherwise complete after the control's.
	warm, err := g.StartConnects(control.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	defer warm()
	if c, err := control.Accept(); err != nil {
		t.Fatalf("guest cannot reach the public address behind the uplink: %v", err)
	} else {
		c.Close()
	}

	closeAll, err := g.StartConnects(agent.Addr().(*net.TCPAddr).AddrPort(), etcd.Addr().(*net.TCPAddr).AddrPort(),
		control.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll()
	c, err := control.Accept()
	if err != nil {
		t.Fatalf("guest cannot reach the public address behind the uplink: %v", err)
	}
	c.Close()
	// Routed SYNs may complete out of order, so wait for the proof that the
	// two management SYNs were handled: the drop rule counted them (this
	// host namespace is ours alone).
	for dropped(t, host) < 2 {
		select {
		case <-ctx.Done():
			t.Fatalf("the management-network rule never dropped the guest's SYNs")
		case <-time.After(10 * time.Millisecond):
		}
	}
	for _, l := range []*net.TCPListener{agent, etcd} {
		got, err := netnstest.Pending(l)
		if err != nil {
			t.Fatal(err)
		}
		if got {
			t.Errorf("guest reached %s on the management network", l.Addr())
		}
	}
}

// dropped reads the packet counters of the management-network drop rules.
func dropped(t *testing.T, host *netnstest.NS) (packets uint64) {
	t.Helper()
	err := host.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		rules, err := c.GetRules(inetTable, &nftables.Chain{Table: inetTable, Name: chainForward})
		if err != nil {
			return err
		}
		for _, r := range rules {
			if !strings.Contains(ruleComment(r), "management network") {
				continue
			}
			for _, e := range r.Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					packets += ctr.Packets
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return packets
}
