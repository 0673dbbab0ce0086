package dnsserver_test

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	"github.com/minicloud/minicloud/agent/network/linux/linuxtest"
)

// upstream is a local stand-in for the host's resolver: test traffic never
// leaves the machine.
type upstream struct {
	addr    netip.AddrPort
	queries atomic.Int64
}

func startUpstream(t *testing.T) *upstream {
	t.Helper()
	// UDP and TCP on the same port, like a real resolver.
	var pc net.PacketConn
	var tl net.Listener
	for {
		var err error
		if pc, err = net.ListenPacket("udp4", "127.0.0.77:0"); err != nil {
			t.Fatal(err)
		}
		if tl, err = net.Listen("tcp4", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close() // the port is taken for TCP: try another
	}
	u := &upstream{addr: pc.LocalAddr().(*net.UDPAddr).AddrPort()}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		u.queries.Add(1)
		m := new(dns.Msg)
		m.SetReply(r)
		if r.Question[0].Name == "example.test." {
			rr, _ := dns.NewRR("example.test. 60 IN A 192.0.2.1")
			m.Answer = append(m.Answer, rr)
		} else {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: tl, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return u
}

type fixture struct {
	n   *linuxtest.Network
	g   *linuxtest.Guest
	s   *dnsserver.Server
	up  *upstream
	ctx context.Context
}

func setup(t *testing.T) *fixture {
	up := startUpstream(t)
	n := linuxtest.NewNetwork(t)
	g := n.AddGuest(t)
	if err := n.Configure(g); err != nil {
		t.Fatal(err)
	}
	// The gateway itself is listed first: the server must skip it, not loop.
	s := dnsserver.New(dnsserver.WithUpstreams(netip.AddrPortFrom(n.Gateway(), 53), up.addr))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		cancel()
	})
	if err := s.SetZone(n.Bridge.Name, dnsserver.Zone{
		Listen: n.Gateway(), Domain: "default.mc.internal",
		Records: map[string]netip.Addr{"web1": n.AddrOf(0), "DB": n.AddrOf(1)},
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitServing(ctx, n.Gateway()); err != nil {
		t.Fatal(err)
	}
	return &fixture{n: n, g: g, s: s, up: up, ctx: ctx}
}

// ask queries the gateway from inside the guest, like its stub resolver.
func (f *fixture) ask(t *testing.T, proto, name string, qtype uint16) *dns.Msg {
	t.Helper()
	var resp *dns.Msg
	err := f.g.Do(func() (err error) {
		c := &dns.Client{Net: proto, Timeout: 5 * time.Second}
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qtype)
		resp, _, err = c.Exchange(m, netip.AddrPortFrom(f.n.Gateway(), 53).String())
		return err
	})
	if err != nil {
		t.Fatalf("%s %s: %v", proto, name, err)
	}
	return resp
}

func wantA(t *testing.T, m *dns.Msg, want netip.Addr) {
	t.Helper()
	if m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("answer %v, want one A %s", m, want)
	}
	a, ok := m.Answer[0].(*dns.A)
	if !ok || a.A.String() != want.String() {
		t.Fatalf("answer %v, want A %s", m.Answer[0], want)
	}
}

func TestAnswersMetadataAndVMNames(t *testing.T) {
	f := setup(t)
	for _, proto := range []string{"udp", "tcp"} {
		wantA(t, f.ask(t, proto, "metadata.google.internal", dns.TypeA), dnsserver.MetadataAddr)
		wantA(t, f.ask(t, proto, "web1", dns.TypeA), f.n.AddrOf(0))
		wantA(t, f.ask(t, proto, "web1.default.mc.internal", dns.TypeA), f.n.AddrOf(0))
		wantA(t, f.ask(t, proto, "db.Default.MC.internal", dns.TypeA), f.n.AddrOf(1))
	}
	if m := f.ask(t, "udp", "web1", dns.TypeAAAA); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 0 {
		t.Errorf("AAAA web1 = %v, want NOERROR without data", m)
	}
	if m := f.ask(t, "udp", "nope.default.mc.internal", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("unknown name in the network's domain = %v, want NXDOMAIN", m)
	}
	rev, _ := dns.ReverseAddr(f.n.AddrOf(0).String())
	m := f.ask(t, "udp", rev, dns.TypePTR)
	if len(m.Answer) != 1 || m.Answer[0].(*dns.PTR).Ptr != "web1.default.mc.internal." {
		t.Errorf("PTR %s = %v", rev, m)
	}
	if n := f.up.queries.Load(); n != 0 {
		t.Errorf("local names were forwarded upstream (%d queries)", n)
	}
}

func TestForwardsToUpstream(t *testing.T) {
	f := setup(t)
	for _, proto := range []string{"udp", "tcp"} {
		wantA(t, f.ask(t, proto, "example.test", dns.TypeA), netip.MustParseAddr("192.0.2.1"))
	}
	if m := f.ask(t, "udp", "missing.test", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("missing.test = %v, want the upstream's NXDOMAIN", m)
	}
	if n := f.up.queries.Load(); n != 3 {
		t.Errorf("upstream saw %d queries, want 3", n)
	}
}

func TestZoneUpdatesApply(t *testing.T) {
	f := setup(t)
	if err := f.s.SetZone(f.n.Bridge.Name, dnsserver.Zone{
		Listen: f.n.Gateway(), Domain: "default.mc.internal",
		Records: map[string]netip.Addr{"web2": f.n.AddrOf(2)},
	}); err != nil {
		t.Fatal(err)
	}
	wantA(t, f.ask(t, "udp", "web2", dns.TypeA), f.n.AddrOf(2))
	if m := f.ask(t, "udp", "web1.default.mc.internal", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("removed web1 still answered: %v", m)
	}
}

// TestRecordUpdatesApply: one name added, moved and removed, the zone's
// other names untouched, the reverse lookup following.
func TestRecordUpdatesApply(t *testing.T) {
	f := setup(t)
	if err := f.s.SetRecord(f.n.Bridge.Name, "Web3", f.n.AddrOf(3)); err != nil {
		t.Fatal(err)
	}
	wantA(t, f.ask(t, "udp", "web3.default.mc.internal", dns.TypeA), f.n.AddrOf(3))
	wantA(t, f.ask(t, "udp", "web1", dns.TypeA), f.n.AddrOf(0))
	if err := f.s.SetRecord(f.n.Bridge.Name, "web3", f.n.AddrOf(4)); err != nil {
		t.Fatal(err)
	}
	wantA(t, f.ask(t, "udp", "web3", dns.TypeA), f.n.AddrOf(4))
	rev, _ := dns.ReverseAddr(f.n.AddrOf(4).String())
	if m := f.ask(t, "udp", rev, dns.TypePTR); len(m.Answer) != 1 || m.Answer[0].(*dns.PTR).Ptr != "web3.default.mc.internal." {
		t.Errorf("PTR %s = %v", rev, m)
	}
	f.s.RemoveRecord(f.n.Bridge.Name, "WEB3")
	if m := f.ask(t, "udp", "web3.default.mc.internal", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("removed web3 still answered: %v", m)
	}
	if m := f.ask(t, "udp", rev, dns.TypePTR); len(m.Answer) != 0 {
		t.Errorf("PTR of a removed name still answered: %v", m)
	}
	wantA(t, f.ask(t, "udp", "db", dns.TypeA), f.n.AddrOf(1))
	if err := f.s.SetRecord("mc-nozone", "x", f.n.AddrOf(5)); err == nil {
		t.Error("SetRecord on a network without a zone: want an error")
	}
}

func TestBadRecordsAreSkipped(t *testing.T) {
	f := setup(t)
	err := f.s.SetZone(f.n.Bridge.Name, dnsserver.Zone{
		Listen: f.n.Gateway(), Domain: "default.mc.internal",
		Records: map[string]netip.Addr{"ok": f.n.AddrOf(3), "bad..name": f.n.AddrOf(4), "v6": netip.MustParseAddr("fd00::1")},
	})
	if err == nil {
		t.Error("SetZone with bad records: want an error")
	}
	wantA(t, f.ask(t, "udp", "ok", dns.TypeA), f.n.AddrOf(3))
}

func TestReadResolvConf(t *testing.T) {
	p := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(p, []byte("search example\nnameserver 127.0.0.53\nnameserver ::1\noptions edns0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := dnsserver.ReadResolvConf(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].String() != "127.0.0.53:53" || got[1].String() != "[::1]:53" {
		t.Fatalf("got %v", got)
	}
	if err := os.WriteFile(p, []byte("search example\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := dnsserver.ReadResolvConf(p); err == nil {
		t.Fatal("no nameserver: want an error")
	}
}
