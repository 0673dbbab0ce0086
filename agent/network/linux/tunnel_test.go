package linux

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// twoHosts is a pair of "hypervisor hosts", each a network namespace with
// its own Linux Manager, joined by a veth underlay (MTU 1500).
type twoHosts struct {
	ns   [2]*netnstest.NS
	m    [2]*inNS
	vtep [2]netip.Addr
	// underlay is host 0's end of the veth; host 1's is underlay+"p".
	underlay string
}

func newTwoHosts(t *testing.T) *twoHosts {
	t.Helper()
	br, _ := networktest.Names()
	id := br[3:]
	h := &twoHosts{vtep: [2]netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.0.2")}}
	for i := range h.ns {
		h.ns[i] = netnstest.NewNS(t, fmt.Sprintf("mch%d-%s", i, id))
		h.m[i] = &inNS{ns: h.ns[i], m: New()}
	}
	up := "mcu" + id
	h.underlay = up
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: up, MTU: 1500}, PeerName: up + "p",
		PeerNamespace: netlink.NsFd(int(h.ns[1].Handle()))}); err != nil {
		t.Fatal(err)
	}
	l, err := netlink.LinkByName(up)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(l, int(h.ns[0].Handle())); err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{up, up + "p"} {
		if err := h.ns[i].Do(func() error {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: h.vtep[i].AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		}); err != nil {
			t.Fatalf("underlay of host %d: %v", i, err)
		}
	}
	return h
}

// tunnelNet is one tunnelled network present on both hosts.
type tunnelNet struct {
	spec [2]network.BridgeSpec
	tap  func(int) string
	n    int
}

func (h *twoHosts) network(t *testing.T, ctx context.Context, gw string, vni uint32) *tunnelNet {
	t.Helper()
	br, tap := networktest.Names()
	tn := &tunnelNet{tap: tap}
	for i := range h.ns {
		tn.spec[i] = network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix(gw), MTU: 1500 - network.VXLANOverhead, NAT: true,
			Tunnel: &network.TunnelSpec{VNI: vni, Local: h.vtep[i]}}
		if err := h.m[i].EnsureBridge(ctx, tn.spec[i]); err != nil {
			t.Fatalf("host %d: %v", i, err)
		}
	}
	return tn
}

type tunnelGuest struct {
	*netnstest.Guest
	host int
	port network.PortSpec
}

// guest plugs a namespace guest into the network on host i, configured
// statically with the network's MTU.
func (h *twoHosts) guest(t *testing.T, ctx context.Context, tn *tunnelNet, host int, ip string) *tunnelGuest {
	t.Helper()
	tap := tn.tap(tn.n)
	tn.n++
	g := netnstest.NewGuestIn(t, h.ns[host], tap, nil)
	port := network.PortSpec{VMID: "vm-" + tap, TapName: tap, Bridge: tn.spec[host].Name, MAC: g.MAC, IP: netip.MustParseAddr(ip), Existing: true}
	if err := h.m[host].EnsurePort(ctx, port); err != nil {
		t.Fatal(err)
	}
	if err := g.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Do(func() error {
		l, err := netlink.LinkByName(netnstest.GuestIf)
		if err != nil {
			return err
		}
		return netlink.LinkSetMTU(l, tn.spec[host].MTU)
	}); err != nil {
		t.Fatal(err)
	}
	if err := g.SetAddr(netip.PrefixFrom(port.IP, tn.spec[host].GatewayCIDR.Bits()), tn.spec[host].GatewayCIDR.Addr()); err != nil {
		t.Fatal(err)
	}
	return &tunnelGuest{Guest: g, host: host, port: port}
}

// program tells each host about the other host's guests, as the agent does
// from the API's stream.
func (h *twoHosts) program(t *testing.T, ctx context.Context, tn *tunnelNet, guests ...*tunnelGuest) {
	t.Helper()
	for i := range h.ns {
		var remote []network.RemotePort
		for _, g := range guests {
			if g.host != i {
				remote = append(remote, network.RemotePort{MAC: g.MAC, IP: g.port.IP, VTEP: h.vtep[g.host]})
			}
		}
		if err := h.m[i].SetRemotePorts(ctx, tn.spec[i].Name, remote); err != nil {
			t.Fatalf("host %d: %v", i, err)
		}
		// Idempotent: a second call changes nothing and fails nothing.
		if err := h.m[i].SetRemotePorts(ctx, tn.spec[i].Name, remote); err != nil {
			t.Fatalf("host %d, again: %v", i, err)
		}
	}
}

// ping sends one ICMP echo of size bytes of payload with Don't Fragment set
// and waits for the reply.
func ping(g *netnstest.Guest, dst netip.Addr, size int, timeout time.Duration) error {
	return g.Do(func() error {
		_, err := netnstest.Echo(dst, size, timeout)
		return err
	})
}

// tcpExchange has the server guest accept one connection and echo what
// it reads; the client sends n bytes and checks they come back.
func tcpExchange(server, client *netnstest.Guest, addr netip.Addr, n int, timeout time.Duration) error {
	var l *net.TCPListener
	if err := server.Do(func() (err error) {
		l, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: addr.AsSlice(), Port: 7000})
		return err
	}); err != nil {
		return err
	}
	defer l.Close()
	_ = l.SetDeadline(time.Now().Add(timeout))
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
		_, _ = io.Copy(c, c)
	}()
	var c net.Conn
	if err := client.Do(func() (err error) {
		c, err = net.DialTimeout("tcp4", net.JoinHostPort(addr.String(), "7000"), timeout)
		return err
	}); err != nil {
		return fmt.Errorf("connect to %s:7000: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	data := bytes.Repeat([]byte("minicloud-vxlan-"), n/16)
	go func() { _, _ = c.Write(data) }()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("echo differs")
	}
	return nil
}

// TestTunnelSpansHosts runs two hosts, each with the real Manager, and
// checks what a tenant sees: guests of one network on different hosts ping
// each other (with a full-MTU, don't-fragment payload) and talk TCP; a
// guest of another network, on either host, reaches neither.
func TestTunnelSpansHosts(t *testing.T) {
	netnstest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h := newTwoHosts(t)
	blue := h.network(t, ctx, "10.250.0.1/24", 100)
	red := h.network(t, ctx, "10.249.0.1/24", 200)
	a := h.guest(t, ctx, blue, 0, "10.250.0.10")
	b := h.guest(t, ctx, blue, 1, "10.250.0.11")
	redA := h.guest(t, ctx, red, 0, "10.249.0.10")
	redB := h.guest(t, ctx, red, 1, "10.249.0.11")
	h.program(t, ctx, blue, a, b)
	h.program(t, ctx, red, redA, redB)

	for _, tc := range []struct {
		from *tunnelGuest
		to   netip.Addr
	}{{a, b.port.IP}, {b, a.port.IP}, {redA, redB.port.IP}} {
		if err := ping(tc.from.Guest, tc.to, 64, 10*time.Second); err != nil {
			t.Fatalf("%s → %s: %v", tc.from.port.IP, tc.to, err)
		}
	}
	// 1422 bytes of ICMP payload make a 1450-byte IP packet: the network's
	// MTU, which is a 1500-byte packet on the underlay once encapsulated.
	if err := ping(a.Guest, b.port.IP, 1500-network.VXLANOverhead-28, 10*time.Second); err != nil {
		t.Fatalf("full-MTU ping across hosts: %v", err)
	}
	if err := tcpExchange(b.Guest, a.Guest, b.port.IP, 1<<20, 30*time.Second); err != nil {
		t.Fatalf("TCP across hosts: %v", err)
	}

	// Another network reaches nothing of blue, across hosts or on the same host.
	for _, tc := range []struct {
		from *tunnelGuest
		to   netip.Addr
	}{{redA, b.port.IP}, {redA, a.port.IP}, {redB, a.port.IP}} {
		if err := ping(tc.from.Guest, tc.to, 64, 2*time.Second); err == nil {
			t.Errorf("red guest %s reached blue guest %s", tc.from.port.IP, tc.to)
		}
	}
	if err := tcpExchange(b.Guest, redA.Guest, b.port.IP, 16, 3*time.Second); err == nil {
		t.Errorf("red guest opened TCP to a blue guest on another host")
	}

	// A guest that sends VXLAN to another host's VTEP (here into red's
	// segment, claiming to be red's guest) is stopped on its own host.
	var inj *net.UDPConn
	if err := a.Do(func() (err error) {
		inj, err = net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(h.vtep[1], VXLANPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer inj.Close()
	frame := netnstest.UDP4(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, redA.MAC,
		netip.AddrPortFrom(redA.port.IP, 9999), netip.AddrPortFrom(netip.MustParseAddr("10.249.0.255"), 9999), []byte("injected"))
	if _, err := inj.Write(vxlanPacket(200, frame)); err != nil {
		t.Fatal(err)
	}
	for forwardDrops(t, h.ns[0], "guests may not send VXLAN") < 1 {
		select {
		case <-ctx.Done():
			t.Fatal("a guest's VXLAN packet towards another host's VTEP was not dropped")
		case <-time.After(10 * time.Millisecond):
		}
	}

	// The spec reads back, and forgetting the remote ports cuts the path.
	got, err := h.m[0].ListBridges(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range got {
		if s.Name == blue.spec[0].Name {
			found = true
			if s.Tunnel == nil || *s.Tunnel != *blue.spec[0].Tunnel || s.MTU != 1450 {
				t.Errorf("ListBridges: %+v (tunnel %+v), want tunnel %+v MTU 1450", s, s.Tunnel, blue.spec[0].Tunnel)
			}
		}
	}
	if !found {
		t.Fatalf("ListBridges lacks %s", blue.spec[0].Name)
	}
	entries := func() (fdb, neigh int) {
		t.Helper()
		if err := h.ns[0].Do(func() error {
			l, err := netlink.LinkByName(TunnelName(blue.spec[0].Name))
			if err != nil {
				return err
			}
			fs, err := netlink.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
			if err != nil {
				return err
			}
			for _, f := range fs {
				if f.LinkIndex == l.Attrs().Index && (f.IP != nil || f.State&netlink.NUD_NOARP != 0 && f.State&netlink.NUD_PERMANENT == 0) {
					fdb++
				}
			}
			ns, err := netlink.NeighList(l.Attrs().Index, unix.AF_INET)
			neigh = len(ns)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return fdb, neigh
	}
	// One remote port: its MAC towards the VTEP, the all-zero MAC towards
	// the VTEP, its MAC on the bridge; one neighbour.
	if fdb, neigh := entries(); fdb != 3 || neigh != 1 {
		t.Errorf("host 0's tunnel has %d forwarding and %d neighbour entries, want 3 and 1", fdb, neigh)
	}
	if err := h.m[0].SetRemotePorts(ctx, blue.spec[0].Name, nil); err != nil {
		t.Fatal(err)
	}
	if fdb, neigh := entries(); fdb != 0 || neigh != 0 {
		t.Errorf("after clearing, host 0's tunnel has %d forwarding and %d neighbour entries, want none", fdb, neigh)
	}
	if err := ping(a.Guest, b.port.IP, 64, 2*time.Second); err == nil {
		t.Errorf("ping still passes after host 0 forgot the remote ports")
	}
	if err := h.m[0].DeleteBridge(ctx, blue.spec[0].Name); err != nil {
		t.Fatal(err)
	}
	if err := h.ns[0].Do(func() error {
		_, err := netlink.LinkByName(TunnelName(blue.spec[0].Name))
		if !isLinkNotFound(err) {
			return fmt.Errorf("tunnel still present after DeleteBridge: %v", err)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

// vxlanPacket wraps an inner Ethernet frame in a VXLAN header.
func vxlanPacket(vni uint32, frame []byte) []byte {
	h := make([]byte, 8, 8+len(frame))
	h[0] = 0x08
	binary.BigEndian.PutUint32(h[4:], vni<<8)
	return append(h, frame...)
}

// TestTunnelDropsForgedFrames plays an attacker on the underlay: VXLAN
// packets sent straight to host 0's VTEP, whose inner frames claim to be a
// local port, the gateway, the metadata address, a DHCP server or an
// unknown port. None reaches the local guest; a frame from the real remote
// port, sent last over the same path, does. A frame from a valid remote
// port addressed to the host (gateway or metadata) is dropped before the
// host sees it.
func TestTunnelDropsForgedFrames(t *testing.T) {
	netnstest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := newTwoHosts(t)
	const vni = 300
	blue := h.network(t, ctx, "10.248.0.1/24", vni)
	a := h.guest(t, ctx, blue, 0, "10.248.0.10")
	b := h.guest(t, ctx, blue, 1, "10.248.0.11")
	h.program(t, ctx, blue, a, b)

	sn, err := a.Sniff()
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	var conn *net.UDPConn
	if err := h.ns[1].Do(func() (err error) {
		conn, err = net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(h.vtep[0], VXLANPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	gw := blue.spec[0].GatewayCIDR.Addr()
	dst := netip.AddrPortFrom(netip.MustParseAddr("10.248.0.255"), 9999)
	ap := func(ip netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(ip, port) }
	forged := []struct {
		name  string
		frame []byte
	}{
		{"local port's MAC and IP", netnstest.UDP4(bcast, a.MAC, ap(a.port.IP, 9999), dst, []byte("forged-local"))},
		{"local port's IP, remote MAC", netnstest.UDP4(bcast, b.MAC, ap(a.port.IP, 9999), dst, []byte("forged-local-ip"))},
		{"the gateway", netnstest.UDP4(bcast, b.MAC, ap(gw, 9999), dst, []byte("forged-gateway"))},
		{"the metadata address", netnstest.UDP4(bcast, b.MAC, ap(network.MetadataAddr, 9999), dst, []byte("forged-metadata"))},
		{"an unknown port", netnstest.UDP4(bcast, netnstest.RandomMAC(), ap(netip.MustParseAddr("10.248.0.99"), 9999), dst, []byte("forged-unknown"))},
		{"a DHCP server", netnstest.UDP4(bcast, b.MAC, ap(b.port.IP, 67), ap(netip.MustParseAddr("255.255.255.255"), 68), []byte("forged-dhcp"))},
		{"ARP for the gateway", netnstest.ARP(bcast, b.MAC, 2, b.MAC, gw, a.MAC, a.port.IP)},
		{"IPv6", netnstest.RouterAdvertisement(b.MAC)},
		{"the host's metadata service, from a valid remote port", netnstest.UDP4(stableMAC(blue.spec[0].Name), b.MAC, ap(b.port.IP, 9999), ap(network.MetadataAddr, 80), []byte("to-metadata"))},
	}
	for _, f := range forged {
		if _, err := conn.Write(vxlanPacket(vni, f.frame)); err != nil {
			t.Fatalf("inject %s: %v", f.name, err)
		}
	}
	// A well-formed frame of the real remote port, but from an underlay
	// address that is no host of the network.
	stranger := netip.MustParseAddr("198.18.0.3")
	var sconn *net.UDPConn
	if err := h.ns[1].Do(func() error {
		l, err := netlink.LinkByName(h.underlay + "p")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: stranger.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		sconn, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(stranger, 0)),
			net.UDPAddrFromAddrPort(netip.AddrPortFrom(h.vtep[0], VXLANPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer sconn.Close()
	if _, err := sconn.Write(vxlanPacket(vni, netnstest.UDP4(bcast, b.MAC, ap(b.port.IP, 9999), dst, []byte("forged-stranger")))); err != nil {
		t.Fatal(err)
	}
	marker := []byte("legit-remote")
	if _, err := conn.Write(vxlanPacket(vni, netnstest.UDP4(bcast, b.MAC, ap(b.port.IP, 9999), dst, marker))); err != nil {
		t.Fatal(err)
	}
	seen, err := sn.Until(ctx, func(f []byte) bool { return netnstest.IsUDP4(f, 9999, marker) })
	if err != nil {
		t.Fatalf("the legitimate frame from the remote port never arrived: %v", err)
	}
	for _, f := range seen {
		if bytes.Contains(f, []byte("forged-")) || len(f) >= 14 && binary.BigEndian.Uint16(f[12:]) != unix.ETH_P_IP {
			t.Errorf("a forged frame reached the local guest: % x", f[:min(len(f), 64)])
		}
	}
	if n := tunnelDrops(t, h.ns[0], "to a gateway or the metadata address"); n < 1 {
		t.Errorf("frame to the metadata address from the tunnel was not dropped by the ingress rule (counter %d)", n)
	}
	if n := ruleCounters(t, h.ns[0], inetTable, chainInput, "VXLAN from an unknown VTEP"); n < 1 {
		t.Errorf("VXLAN from an unknown underlay address was not dropped (counter %d)", n)
	}
	if n := tunnelDrops(t, h.ns[0], "forged source from a tunnel"); n < 2 {
		t.Errorf("forged-source drops %d, want at least 2", n)
	}
}

// tunnelDrops sums the counters of the tunnel ingress rules whose comment
// contains what.
func tunnelDrops(t *testing.T, host *netnstest.NS, what string) uint64 {
	t.Helper()
	return ruleCounters(t, host, bridgeTable, chainTunnelIngress, what)
}

// forwardDrops sums the counters of the inet forward rules whose comment
// contains what.
func forwardDrops(t *testing.T, host *netnstest.NS, what string) (packets uint64) {
	t.Helper()
	return ruleCounters(t, host, inetTable, chainForward, what)
}

func ruleCounters(t *testing.T, host *netnstest.NS, table *nftables.Table, chain, what string) (packets uint64) {
	t.Helper()
	if err := host.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		rules, err := c.GetRules(table, &nftables.Chain{Table: table, Name: chain})
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
	}); err != nil {
		t.Fatal(err)
	}
	return packets
}
