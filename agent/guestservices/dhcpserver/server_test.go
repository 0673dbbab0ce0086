package dhcpserver_test

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"

	"github.com/minicloud/minicloud/agent/guestservices/dhcpserver"
	"github.com/minicloud/minicloud/agent/network/linux/linuxtest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// logWatch is a slog handler that reports records to the test.
type logWatch struct {
	mu      sync.Mutex
	records []slog.Record
	notify  chan struct{}
}

func newLogWatch() *logWatch { return &logWatch{notify: make(chan struct{}, 1)} }

func (w *logWatch) Enabled(context.Context, slog.Level) bool { return true }
func (w *logWatch) WithAttrs([]slog.Attr) slog.Handler       { return w }
func (w *logWatch) WithGroup(string) slog.Handler            { return w }
func (w *logWatch) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	w.records = append(w.records, r.Clone())
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
	return nil
}

// waitFor blocks until a record with msg and attr key=value was logged.
func (w *logWatch) waitFor(ctx context.Context, msg, key, value string) bool {
	for {
		w.mu.Lock()
		for _, r := range w.records {
			found := false
			r.Attrs(func(a slog.Attr) bool {
				if a.Key == key && a.Value.String() == value {
					found = true
				}
				return true
			})
			if r.Message == msg && found {
				w.mu.Unlock()
				return true
			}
		}
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			return false
		case <-w.notify:
		}
	}
}

func leaseFor(n *linuxtest.Network, g *linuxtest.Guest, host string) dhcpserver.Lease {
	return dhcpserver.Lease{
		MAC: g.MAC, Address: netip.PrefixFrom(g.Port.IP, 24), Gateway: n.Gateway(),
		DNS: []netip.Addr{n.Gateway()}, MTU: 1450, Hostname: host, Domain: "mc.internal",
		LeaseTime: 2 * time.Hour,
	}
}

func startServer(t *testing.T, log *slog.Logger) *dhcpserver.Server {
	s := dhcpserver.New(dhcpserver.WithLogger(log))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s
}

func TestGuestsGetTheirOwnAddress(t *testing.T) {
	n := linuxtest.NewNetwork(t)
	g1, g2, neighbour := n.AddGuest(t), n.AddGuest(t), n.AddGuest(t)
	// The neighbour watches the bridge: replies go to each client's MAC,
	// so it must never see another guest's offer or ack.
	sniff, err := neighbour.Sniff()
	if err != nil {
		t.Fatal(err)
	}
	defer sniff.Close()
	s := startServer(t, slog.Default())
	if err := s.SetLeases(n.Bridge.Name, []dhcpserver.Lease{leaseFor(n, g1, "web1"), leaseFor(n, g2, "web2")}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.WaitServing(ctx, n.Bridge.Name); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		g    *linuxtest.Guest
		host string
	}{{g1, "web1"}, {g2, "web2"}} {
		lease, err := tc.g.DHCP(ctx)
		if err != nil {
			t.Fatalf("%s: %v", tc.host, err)
		}
		ack := lease.ACK
		if got := ack.YourIPAddr.String(); got != tc.g.Port.IP.String() {
			t.Errorf("%s got %s, want %s", tc.host, got, tc.g.Port.IP)
		}
		gw := net.IP(n.Gateway().AsSlice())
		if r := ack.Router(); len(r) != 1 || !r[0].Equal(gw) {
			t.Errorf("%s router = %v, want %s", tc.host, r, gw)
		}
		if d := ack.DNS(); len(d) != 1 || !d[0].Equal(gw) {
			t.Errorf("%s DNS = %v, want %s", tc.host, d, gw)
		}
		if ones, _ := ack.SubnetMask().Size(); ones != 24 {
			t.Errorf("%s mask /%d, want /24", tc.host, ones)
		}
		if mtu := ack.Options.Get(dhcpv4.OptionInterfaceMTU); len(mtu) != 2 || int(mtu[0])<<8|int(mtu[1]) != 1450 {
			t.Errorf("%s MTU option = %v, want 1450", tc.host, mtu)
		}
		if h := ack.HostName(); h != tc.host {
			t.Errorf("hostname = %q, want %q", h, tc.host)
		}
		if d := ack.DomainName(); d != "mc.internal" {
			t.Errorf("domain = %q", d)
		}
		if lt := ack.IPAddressLeaseTime(0); lt != 2*time.Hour {
			t.Errorf("lease time = %v, want 2h", lt)
		}
		if sid := ack.ServerIdentifier(); !sid.Equal(gw) {
			t.Errorf("server identifier = %v, want %s", sid, gw)
		}
		got, err := tc.g.Addr()
		if err != nil || got.Addr() != tc.g.Port.IP {
			t.Errorf("%s configured %v (%v), want %s", tc.host, got, err, tc.g.Port.IP)
		}
	}
	marker := []byte("marker:after-dhcp")
	bcast := netip.MustParseAddr("255.255.255.255")
	if err := g2.SendFrames(netnstest.UDP4(netnstest.Broadcast, g2.MAC,
		netip.AddrPortFrom(g2.Port.IP, 4000), netip.AddrPortFrom(bcast, 9), marker)); err != nil {
		t.Fatal(err)
	}
	seen, err := sniff.Until(ctx, func(f []byte) bool { return netnstest.IsUDP4(f, 9, marker) })
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range seen {
		if isDHCPReply(f) {
			t.Errorf("the neighbour saw a DHCP reply meant for another guest: % x", f[:min(len(f), 64)])
		}
	}
}

// isDHCPReply reports an IPv4 UDP datagram from port 67 to port 68.
func isDHCPReply(f []byte) bool {
	if len(f) < 14+20+8 || f[12] != 0x08 || f[13] != 0x00 || f[14+9] != 17 {
		return false
	}
	udp := f[14+int(f[14]&0x0f)*4:]
	return len(udp) >= 4 && udp[0] == 0 && udp[1] == 67 && udp[2] == 0 && udp[3] == 68
}

func TestUnknownMACGetsNothing(t *testing.T) {
	n := linuxtest.NewNetwork(t)
	known, stranger := n.AddGuest(t), n.AddGuest(t)
	w := newLogWatch()
	s := startServer(t, slog.New(w))
	// The stranger's port is filtered like any VM's, but has no lease.
	if err := s.SetLeases(n.Bridge.Name, []dhcpserver.Lease{leaseFor(n, known, "known")}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.WaitServing(ctx, n.Bridge.Name); err != nil {
		t.Fatal(err)
	}
	// The known guest first proves the server listens on this bridge.
	if _, err := known.DHCP(ctx); err != nil {
		t.Fatalf("known guest: %v", err)
	}
	type result struct {
		lease *nclient4.Lease
		err   error
	}
	rc := make(chan result, 1)
	go func() {
		l, err := stranger.DHCP(ctx, nclient4.WithTimeout(time.Second), nclient4.WithRetry(1))
		rc <- result{l, err}
	}()
	// The server saw the stranger's discover and decided not to answer...
	if !w.waitFor(ctx, "no lease for MAC: not answering", "mac", stranger.MAC.String()) {
		t.Fatalf("server never logged the stranger's request")
	}
	// ...and the stranger indeed got no offer.
	if r := <-rc; r.err == nil {
		t.Fatalf("stranger got a lease: %v", r.lease.ACK.Summary())
	}
	if a, _ := stranger.Addr(); a.IsValid() {
		t.Errorf("stranger has address %s", a)
	}
}

func TestRequestForAnotherAddressIsRefused(t *testing.T) {
	n := linuxtest.NewNetwork(t)
	g := n.AddGuest(t)
	s := startServer(t, slog.Default())
	if err := s.SetLeases(n.Bridge.Name, []dhcpserver.Lease{leaseFor(n, g, "g")}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.WaitServing(ctx, n.Bridge.Name); err != nil {
		t.Fatal(err)
	}
	other := n.AddrOf(7)
	var c *nclient4.Client
	if err := g.Do(func() (err error) { c, err = nclient4.New("eth0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	offer, err := c.DiscoverOffer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Ask for a neighbour's address in the REQUEST.
	offer.YourIPAddr = other.AsSlice()
	_, err = c.RequestFromOffer(ctx, offer)
	var nak *nclient4.ErrNak
	if err == nil || !asNak(err, &nak) {
		t.Fatalf("REQUEST for %s = %v, want a NAK", other, err)
	}
}

func asNak(err error, target **nclient4.ErrNak) bool {
	for e := err; e != nil; {
		if n, ok := e.(*nclient4.ErrNak); ok {
			*target = n
			return true
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			return false
		}
		e = u.Unwrap()
	}
	return false
}

func TestListenerFollowsBridge(t *testing.T) {
	n := linuxtest.NewNetwork(t)
	g := n.AddGuest(t)
	s := startServer(t, slog.Default())
	if err := s.SetLeases(n.Bridge.Name, []dhcpserver.Lease{leaseFor(n, g, "g")}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := s.WaitServing(ctx, n.Bridge.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := g.DHCP(ctx); err != nil {
		t.Fatal(err)
	}
	// Re-create the bridge: the server must notice and listen on the new one.
	if err := n.Manager.DeleteBridge(ctx, n.Bridge.Name); err != nil {
		t.Fatal(err)
	}
	if err := n.Manager.EnsureBridge(ctx, n.Bridge); err != nil {
		t.Fatal(err)
	}
	if err := n.Manager.EnsurePort(ctx, g.Port); err != nil {
		t.Fatal(err)
	}
	if _, err := g.DHCP(ctx); err != nil {
		t.Fatalf("after bridge re-creation: %v", err)
	}
}
