package linux

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestNoRoutingBetweenNetworks puts two guest networks on one host (a
// namespace of its own, forwarding on) with different CIDRs, as two
// projects' networks would be, and checks the host routes nothing between
// them in either direction, while guests of one network still reach each
// other, and a guest reaches its own gateway's DNS but not another
// network's. The host does not know projects: this holds between any two
// networks, of one project or of two (docs/networking.md).
func TestNoRoutingBetweenNetworks(t *testing.T) {
	netnstest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	brA, tapA := networktest.Names()
	brB, tapB := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+brA)
	m := &inNS{ns: host, m: New()}

	netA := network.BridgeSpec{Name: brA, GatewayCIDR: netip.MustParsePrefix("10.251.1.1/24"), NAT: true}
	netB := network.BridgeSpec{Name: brB, GatewayCIDR: netip.MustParsePrefix("10.251.2.1/24"), NAT: true}
	type guest struct {
		*netnstest.Guest
		ip netip.Addr
	}
	plug := func(n network.BridgeSpec, tap, ip string) guest {
		t.Helper()
		g := netnstest.NewGuestIn(t, host, tap, nil)
		p := network.PortSpec{VMID: "vm-" + tap, TapName: tap, Bridge: n.Name, MAC: g.MAC, IP: netip.MustParseAddr(ip), Existing: true}
		if err := m.EnsurePort(ctx, p); err != nil {
			t.Fatal(err)
		}
		if err := g.WaitUp(ctx); err != nil {
			t.Fatal(err)
		}
		if err := g.SetAddr(netip.PrefixFrom(p.IP, n.GatewayCIDR.Bits()), n.GatewayCIDR.Addr()); err != nil {
			t.Fatal(err)
		}
		return guest{g, p.IP}
	}
	for _, n := range []network.BridgeSpec{netA, netB} {
		if err := m.EnsureBridge(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	a1 := plug(netA, tapA(0), "10.251.1.10")
	a2 := plug(netA, tapA(1), "10.251.1.11")
	b1 := plug(netB, tapB(0), "10.251.2.10")

	listen := func(ns *netnstest.NS, a netip.AddrPort) *net.TCPListener {
		t.Helper()
		var l *net.TCPListener
		if err := ns.Do(func() (err error) {
			l, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(a))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		dl, _ := ctx.Deadline()
		_ = l.SetDeadline(dl)
		return l
	}
	ap := netip.AddrPortFrom
	onA1 := listen(a1.NS, ap(a1.ip, 9000))
	onA2 := listen(a2.NS, ap(a2.ip, 9000))
	onB1 := listen(b1.NS, ap(b1.ip, 9000))
	dnsA := listen(host, ap(netA.GatewayCIDR.Addr(), 53))
	dnsB := listen(host, ap(netB.GatewayCIDR.Addr(), 53))

	accept := func(l *net.TCPListener, what string) {
		t.Helper()
		c, err := l.Accept()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		c.Close()
	}
	// Warm the paths (neighbour entries) before any counting.
	for _, w := range []struct {
		from guest
		l    *net.TCPListener
		dst  netip.AddrPort
	}{{a1, onA2, ap(a2.ip, 9000)}, {a1, dnsA, ap(netA.GatewayCIDR.Addr(), 53)}, {b1, dnsB, ap(netB.GatewayCIDR.Addr(), 53)}} {
		done, err := w.from.StartConnects(w.dst)
		if err != nil {
			t.Fatal(err)
		}
		accept(w.l, "warm-up to "+w.dst.String())
		done()
	}

	routed0 := counted(t, host, chainForward, "no routing between guest networks")
	hostDrop0 := counted(t, host, chainGuestInput, "anything else on the host")

	// A to B: the other network's guest and the other network's gateway
	// (DNS is allowed on the guest's own gateway only), then the controls
	// on A's own network and gateway.
	done, err := a1.StartConnects(ap(b1.ip, 9000), ap(netB.GatewayCIDR.Addr(), 53), ap(netA.GatewayCIDR.Addr(), 53), ap(a2.ip, 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	accept(dnsA, "a1 to its own gateway's DNS")
	accept(onA2, "a1 to a2 on the same network")
	// B to A.
	done2, err := b1.StartConnects(ap(a1.ip, 9000), ap(netB.GatewayCIDR.Addr(), 53))
	if err != nil {
		t.Fatal(err)
	}
	defer done2()
	accept(dnsB, "b1 to its own gateway's DNS")

	// Routed SYNs may complete out of order with bridged ones: wait for the
	// drop rules to have counted them (this host namespace is ours alone).
	for counted(t, host, chainForward, "no routing between guest networks")-routed0 < 2 ||
		counted(t, host, chainGuestInput, "anything else on the host")-hostDrop0 < 1 {
		select {
		case <-ctx.Done():
			t.Fatalf("the drop rules never counted the cross-network SYNs")
		case <-time.After(10 * time.Millisecond):
		}
	}
	for _, c := range []struct {
		l    *net.TCPListener
		what string
	}{{onB1, "a1 reached b1 on the other network"}, {onA1, "b1 reached a1 on the other network"}, {dnsB, "a1 reached DNS on the other network's gateway"}} {
		got, err := netnstest.Pending(c.l)
		if err != nil {
			t.Fatal(err)
		}
		if got {
			t.Error(c.what)
		}
	}

	// DHCP: a guest may unicast to its own gateway (a renewal), not to
	// another network's gateway, where a DHCP server bound to no device
	// would answer it.
	udpOn := func(a netip.Addr) *net.UDPConn {
		t.Helper()
		var c *net.UDPConn
		if err := host.Do(func() (err error) {
			c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(ap(a, 67)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dhcpA, dhcpB := udpOn(netA.GatewayCIDR.Addr()), udpOn(netB.GatewayCIDR.Addr())
	// No SYN retransmission of the connects above may be counted below.
	done()
	done2()
	hostDrop1 := counted(t, host, chainGuestInput, "anything else on the host")
	if err := a1.Do(func() error {
		for _, gw := range []netip.Addr{netB.GatewayCIDR.Addr(), netA.GatewayCIDR.Addr()} {
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(ap(gw, 67)))
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("renew " + gw.String()))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	_ = dhcpA.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, _, err := dhcpA.ReadFromUDP(buf); err != nil {
		t.Fatalf("a1's DHCP unicast to its own gateway: %v", err)
	} else if want := "renew " + netA.GatewayCIDR.Addr().String(); string(buf[:n]) != want {
		t.Fatalf("own gateway's DHCP port got %q, want %q", buf[:n], want)
	}
	// Both datagrams took the same path in order: the other gateway's,
	// sent first, has been delivered or dropped by now.
	if got, ok := pendingUDP(t, dhcpB); ok {
		t.Errorf("a1 reached the DHCP port of the other network's gateway: %q", got)
	}
	if counted(t, host, chainGuestInput, "anything else on the host") == hostDrop1 {
		t.Errorf("the host's drop rule did not count a1's DHCP to the other network's gateway")
	}
}

// counted sums the packet counters of the chain's rules whose comment
// contains what.
func counted(t *testing.T, host *netnstest.NS, chain, what string) (packets uint64) {
	t.Helper()
	err := host.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		rules, err := c.GetRules(inetTable, &nftables.Chain{Table: inetTable, Name: chain})
		if err != nil {
			return err
		}
		for _, r := range rules {
			if !strings.Contains(ruleComment(r), what) {
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

// pendingUDP reads a datagram waiting on c without waiting for one.
func pendingUDP(t *testing.T, c *net.UDPConn) (string, bool) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n := -1
	if err := rc.Control(func(fd uintptr) {
		n, _, _ = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
	}); err != nil {
		t.Fatal(err)
	}
	if n < 0 {
		return "", false
	}
	return string(buf[:n]), true
}
