package linux_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/linux"
	"github.com/minicloud/minicloud/agent/network/linux/linuxtest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// Every test here plays a hostile guest with raw frames and checks what
// reaches its neighbours and the host. The pattern: start capturing, send
// the forged frames, then one legitimate marker frame over the same path;
// when the marker arrives, anything forged that got through has arrived too.

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

func bridgeMAC(t *testing.T, name string) net.HardwareAddr {
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().HardwareAddr
}

// expectOnly captures on s until the marker arrives and fails if any frame
// seen before carries one of the forged payloads.
func expectOnly(t *testing.T, ctx context.Context, where string, s *netnstest.Sniffer, marker []byte, forged map[string][]byte) {
	t.Helper()
	seen, err := s.Until(ctx, func(f []byte) bool { return strings.Contains(string(f), string(marker)) })
	if err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	for _, f := range seen {
		for name, p := range forged {
			if strings.Contains(string(f), string(p)) {
				t.Errorf("%s received the %s frame", where, name)
			}
		}
	}
}

func TestForgedSourcesAreDropped(t *testing.T) {
	ctx := testCtx(t)
	n := linuxtest.NewNetwork(t)
	victim, attacker, observer := n.AddGuest(t), n.AddGuest(t), n.AddGuest(t)
	for _, g := range []*linuxtest.Guest{victim, attacker, observer} {
		if err := n.Configure(g); err != nil {
			t.Fatal(err)
		}
	}
	atObserver, err := observer.Sniff()
	if err != nil {
		t.Fatal(err)
	}
	defer atObserver.Close()
	atHost, err := netnstest.SniffHost(n.Bridge.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer atHost.Close()

	a, v, o := attacker.Port, victim.Port, observer.Port
	gwMAC := bridgeMAC(t, n.Bridge.Name)
	forged := map[string][]byte{}
	var frames [][]byte
	forge := func(name string, dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr) {
		payload := []byte("forged:" + name)
		forged[name] = payload
		frames = append(frames, netnstest.UDP4(dstMAC, srcMAC, ap(src, 4000), ap(dst, 9), payload))
	}
	for _, dst := range []struct {
		mac net.HardwareAddr
		ip  netip.Addr
	}{{o.MAC, o.IP}, {gwMAC, n.Gateway()}} {
		forge("victim's IP to "+dst.ip.String(), dst.mac, a.MAC, v.IP, dst.ip)
		forge("victim's MAC to "+dst.ip.String(), dst.mac, v.MAC, a.IP, dst.ip)
		forge("victim's MAC and IP to "+dst.ip.String(), dst.mac, v.MAC, v.IP, dst.ip)
		forge("gateway's IP to "+dst.ip.String(), dst.mac, a.MAC, n.Gateway(), dst.ip)
		forge("metadata IP to "+dst.ip.String(), dst.mac, a.MAC, network.MetadataAddr, dst.ip)
		forge("random IP to "+dst.ip.String(), dst.mac, a.MAC, netip.MustParseAddr("192.0.2.7"), dst.ip)
		forge("random MAC to "+dst.ip.String(), dst.mac, netnstest.RandomMAC(), a.IP, dst.ip)
	}
	marker := []byte("marker:legit")
	frames = append(frames,
		netnstest.UDP4(o.MAC, a.MAC, ap(a.IP, 4000), ap(o.IP, 9), marker),
		netnstest.UDP4(gwMAC, a.MAC, ap(a.IP, 4000), ap(n.Gateway(), 9), marker))
	if err := attacker.SendFrames(frames...); err != nil {
		t.Fatal(err)
	}
	expectOnly(t, ctx, "observer", atObserver, marker, forged)
	expectOnly(t, ctx, "host", atHost, marker, forged)
}

func TestGuestCannotServeDHCPOrRouterAdvertisements(t *testing.T) {
	ctx := testCtx(t)
	n := linuxtest.NewNetwork(t)
	victim, attacker := n.AddGuest(t), n.AddGuest(t)
	for _, g := range []*linuxtest.Guest{victim, attacker} {
		if err := n.Configure(g); err != nil {
			t.Fatal(err)
		}
	}
	atVictim, err := victim.Sniff()
	if err != nil {
		t.Fatal(err)
	}
	defer atVictim.Close()
	atHost, err := netnstest.SniffHost(n.Bridge.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer atHost.Close()

	a := attacker.Port
	bcast := netip.MustParseAddr("255.255.255.255")
	offer := []byte("forged:dhcp-offer")
	frames := [][]byte{
		netnstest.UDP4(netnstest.Broadcast, a.MAC, ap(a.IP, 67), ap(bcast, 68), offer),
		netnstest.UDP4(victim.MAC, a.MAC, ap(a.IP, 67), ap(victim.Port.IP, 68), offer),
		netnstest.DHCPv6Reply(a.MAC),
		netnstest.RouterAdvertisement(a.MAC),
	}
	marker := []byte("marker:legit-broadcast")
	frames = append(frames, netnstest.UDP4(netnstest.Broadcast, a.MAC, ap(a.IP, 4000), ap(bcast, 9), marker))
	if err := attacker.SendFrames(frames...); err != nil {
		t.Fatal(err)
	}
	for where, s := range map[string]*netnstest.Sniffer{"victim": atVictim, "host": atHost} {
		seen, err := s.Until(ctx, func(f []byte) bool { return strings.Contains(string(f), string(marker)) })
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		for _, f := range seen {
			switch {
			case strings.Contains(string(f), string(offer)):
				t.Errorf("%s received the guest's DHCP offer", where)
			case len(f) > 14 && f[12] == 0x86 && f[13] == 0xdd:
				if ip6From(f, a.MAC) {
					t.Errorf("%s received IPv6 (DHCPv6 or RA) from the guest: % x", where, f[:min(len(f), 80)])
				}
			}
		}
	}
}

// ip6From reports whether an IPv6 frame was sent by mac.
func ip6From(f []byte, mac net.HardwareAddr) bool {
	return len(f) > 12 && net.HardwareAddr(f[6:12]).String() == mac.String()
}

func TestARPPoisoningLeavesNeighboursUnchanged(t *testing.T) {
	ctx := testCtx(t)
	n := linuxtest.NewNetwork(t)
	victim, attacker, neighbour := n.AddGuest(t), n.AddGuest(t), n.AddGuest(t)
	for _, g := range []*linuxtest.Guest{victim, attacker, neighbour} {
		if err := n.Configure(g); err != nil {
			t.Fatal(err)
		}
	}
	gwMAC := bridgeMAC(t, n.Bridge.Name)
	stale := netnstest.RandomMAC()
	// The victim knows the gateway and the neighbour, and has a stale,
	// wrong entry for the attacker that a legitimate gratuitous ARP fixes.
	entries := map[netip.Addr]net.HardwareAddr{n.Gateway(): gwMAC, neighbour.Port.IP: neighbour.MAC, attacker.Port.IP: stale}
	if err := victim.Do(func() error {
		l, err := netlink.LinkByName(netnstest.GuestIf)
		if err != nil {
			return err
		}
		for ip, mac := range entries {
			if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET,
				State: netlink.NUD_STALE, IP: ip.AsSlice(), HardwareAddr: mac}); err != nil {
				return fmt.Errorf("neighbour %s: %w", ip, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	updates := make(chan netlink.NeighUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	h := victim.Handle()
	if err := netlink.NeighSubscribeWithOptions(updates, done, netlink.NeighSubscribeOptions{Namespace: &h}); err != nil {
		t.Fatal(err)
	}

	a := attacker.Port
	garp := func(senderMAC net.HardwareAddr, ip netip.Addr) []byte {
		return netnstest.ARP(netnstest.Broadcast, a.MAC, 1, senderMAC, ip, nil, ip)
	}
	frames := [][]byte{
		garp(a.MAC, n.Gateway()),               // claim the gateway
		garp(a.MAC, neighbour.Port.IP),         // claim the neighbour
		garp(a.MAC, network.MetadataAddr),      // claim the metadata address
		garp(neighbour.MAC, neighbour.Port.IP), // ARP sender MAC forged, Ethernet source own
		netnstest.ARP(victim.MAC, a.MAC, 2, a.MAC, n.Gateway(), victim.MAC, victim.Port.IP), // unicast reply
		garp(a.MAC, a.IP), // marker: legitimate gratuitous ARP
	}
	if err := attacker.SendFrames(frames...); err != nil {
		t.Fatal(err)
	}
	for {
		var u netlink.NeighUpdate
		select {
		case <-ctx.Done():
			t.Fatalf("the victim never learned the attacker's legitimate gratuitous ARP")
		case u = <-updates:
		}
		ip, _ := netip.AddrFromSlice(u.IP.To4())
		if want, ok := entries[ip]; ok && ip != a.IP && u.HardwareAddr.String() != want.String() {
			t.Errorf("victim's entry for %s changed to %s (want %s)", ip, u.HardwareAddr, want)
		}
		if ip == a.IP && u.HardwareAddr.String() == a.MAC.String() {
			break
		}
	}
	// Double-check the final table, not just the events.
	if err := victim.Do(func() error {
		l, err := netlink.LinkByName(netnstest.GuestIf)
		if err != nil {
			return err
		}
		list, err := netlink.NeighList(l.Attrs().Index, unix.AF_INET)
		if err != nil {
			return err
		}
		for _, nb := range list {
			ip, _ := netip.AddrFromSlice(nb.IP.To4())
			if want, ok := entries[ip]; ok && ip != a.IP && nb.HardwareAddr.String() != want.String() {
				t.Errorf("victim's table maps %s to %s, want %s", ip, nb.HardwareAddr, want)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func TestHostServicesUnreachableFromGuests(t *testing.T) {
	ctx := testCtx(t)
	n := linuxtest.NewNetwork(t)
	g := n.AddGuest(t)
	if err := n.Configure(g); err != nil {
		t.Fatal(err)
	}
	gw := n.Gateway()
	listen := func(addr netip.AddrPort) *net.TCPListener {
		l, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(addr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	// Ports the host really uses (API, etcd, agent) plus one nobody uses;
	// DNS on the gateway is allowed and is the control.
	blocked := []uint16{8640, 8641, 2379, 2389, 2390, 8642, 8643, 22, 16509}
	var blockedLs []*net.TCPListener
	for _, p := range blocked {
		blockedLs = append(blockedLs, listen(ap(gw, p)))
	}
	control := listen(ap(gw, 53))

	dl, _ := ctx.Deadline()
	_ = control.SetDeadline(dl)
	// Warm the path first (neighbour entries): a first SYN parked behind ARP
	// resolution could otherwise complete after the control's.
	warm, err := g.StartConnects(ap(gw, 53))
	if err != nil {
		t.Fatal(err)
	}
	defer warm()
	if c, err := control.Accept(); err != nil {
		t.Fatalf("control connection to DNS on the gateway: %v", err)
	} else {
		c.Close()
	}
	// SYNs to every blocked port first, then to the control port: once the
	// control connection is accepted, a reachable blocked port would have a
	// connection queued too.
	var dsts []netip.AddrPort
	for _, p := range blocked {
		dsts = append(dsts, ap(gw, p))
	}
	closeAll, err := g.StartConnects(append(dsts, ap(gw, 53))...)
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll()
	c, err := control.Accept()
	if err != nil {
		t.Fatalf("control connection to DNS on the gateway: %v", err)
	}
	c.Close()
	for _, l := range blockedLs {
		got, err := netnstest.Pending(l)
		if err != nil {
			t.Fatal(err)
		}
		if got {
			t.Errorf("guest reached host port %s", l.Addr())
		}
	}
}

func TestNATRuleForTheNetwork(t *testing.T) {
	n := linuxtest.NewNetwork(t)
	cidr := n.Bridge.GatewayCIDR.Masked().String()
	out, err := exec.Command("nft", "list", "chain", "inet", "minicloud", "postrouting").CombinedOutput()
	if err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	want := fmt.Sprintf(`ip saddr %s oifname != "%s"`, cidr, n.Bridge.Name)
	if !strings.Contains(string(out), want) || !strings.Contains(string(out), "masquerade") {
		t.Fatalf("postrouting has no masquerade for %s:\n%s", cidr, out)
	}
	off := n.Bridge
	off.NAT = false
	if err := n.Manager.EnsureBridge(context.Background(), off); err != nil {
		t.Fatal(err)
	}
	out, _ = exec.Command("nft", "list", "chain", "inet", "minicloud", "postrouting").CombinedOutput()
	if strings.Contains(string(out), want) {
		t.Fatalf("masquerade for %s still there with NAT off:\n%s", cidr, out)
	}
}

// TestRestartKeepsFiltering plays an agent restart: a new Manager over the
// same kernel state converges the same network. An nftables monitor records
// every ruleset change meanwhile: the restarted manager must change nothing
// (it measures before it acts, and never flushes on start), so filtering has
// no gap, and forged frames stay dropped afterwards.
func TestRestartKeepsFiltering(t *testing.T) {
	ctx := testCtx(t)
	n := linuxtest.NewNetwork(t)
	victim, attacker := n.AddGuest(t), n.AddGuest(t)
	for _, g := range []*linuxtest.Guest{victim, attacker} {
		if err := n.Configure(g); err != nil {
			t.Fatal(err)
		}
	}

	conn, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	mon := nftables.NewMonitor()
	defer mon.Close()
	events, err := conn.AddMonitor(mon) // subscribed when this returns
	if err != nil {
		t.Fatal(err)
	}

	restarted := linux.New()
	if err := restarted.EnsureBridge(ctx, n.Bridge); err != nil {
		t.Fatal(err)
	}
	for _, g := range []*linuxtest.Guest{victim, attacker} {
		if err := restarted.EnsurePort(ctx, g.Port); err != nil {
			t.Fatal(err)
		}
	}
	// End marker: a change of our own, after the convergence.
	noNAT := n.Bridge
	noNAT.NAT = false
	if err := restarted.EnsureBridge(ctx, noNAT); err != nil {
		t.Fatal(err)
	}
	ours := func(key []byte) bool {
		return strings.Contains(string(key), n.ID) // our bridge and tap names carry the network's id
	}
	for done := false; !done; {
		var ev *nftables.MonitorEvent
		select {
		case <-ctx.Done():
			t.Fatal("never saw the end marker (NAT rule removal)")
		case ev = <-events:
		}
		switch ev.Type {
		case nftables.MonitorEventTypeDelRule:
			r, _ := ev.Data.(*nftables.Rule)
			if r != nil && r.Chain != nil && r.Chain.Name == "postrouting" {
				done = true // the marker; earlier rule events are failures below
				continue
			}
			t.Errorf("restart deleted a rule: %+v", ev.Data)
		case nftables.MonitorEventTypeNewRule, nftables.MonitorEventTypeDelChain, nftables.MonitorEventTypeDelTable,
			nftables.MonitorEventTypeDelSet:
			if r, ok := ev.Data.(*nftables.Rule); ok && r.Table != nil && r.Table.Name != "minicloud" {
				continue
			}
			t.Errorf("restart changed the ruleset: event %d %+v", ev.Type, ev.Data)
		case nftables.MonitorEventTypeNewSetElem, nftables.MonitorEventTypeDelSetElem:
			els, _ := ev.Data.([]nftables.SetElement)
			for _, e := range els {
				if ours(e.Key) {
					t.Errorf("restart rewrote a set element of this network (event %d): %q", ev.Type, e.Key)
				}
			}
		}
	}

	atVictim, err := victim.Sniff()
	if err != nil {
		t.Fatal(err)
	}
	defer atVictim.Close()
	a, v := attacker.Port, victim.Port
	forged := []byte("forged:after-restart")
	marker := []byte("marker:after-restart")
	if err := attacker.SendFrames(
		netnstest.UDP4(v.MAC, a.MAC, ap(v.IP, 1), ap(v.IP, 9), forged),
		netnstest.UDP4(v.MAC, a.MAC, ap(a.IP, 1), ap(v.IP, 9), marker),
	); err != nil {
		t.Fatal(err)
	}
	expectOnly(t, ctx, "victim", atVictim, marker, map[string][]byte{"forged": forged})
}
