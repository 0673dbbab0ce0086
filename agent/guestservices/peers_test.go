package guestservices

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	"github.com/minicloud/minicloud/agent/network/linux/linuxtest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestDNSAnswersTheNetworksOtherHosts: a guest asks its host's DNS for a VM
// of its network that runs on another host and gets its address; a name of
// this host's guests keeps the local address; a VM of another network is
// unknown.
func TestDNSAnswersTheNetworksOtherHosts(t *testing.T) {
	n := linuxtest.NewNetwork(t)
	g := n.AddGuest(t)
	if err := n.Configure(g); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := dnsserver.New(dnsserver.WithUpstreams())
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(runCtx) }()
	defer func() { stop(); <-done }()

	h := &Services{dns: s, leases: map[string]int{n.Bridge.Name: 1}}
	h.zones = map[string]*dnsserver.Zone{n.Bridge.Name: {Listen: n.Gateway(), Domain: "minicloud.internal",
		Records: map[string]netip.Addr{"local1": n.AddrOf(0)}}}
	ports := []*minicloudv1.NetworkPort{
		{Bridge: n.Bridge.Name, Hostname: "remote1", Ip: n.AddrOf(5).String(), Host: "h2"},
		{Bridge: n.Bridge.Name, Hostname: "local1", Ip: n.AddrOf(6).String(), Host: "h2"},
		{Bridge: "mc-other000", Hostname: "elsewhere", Ip: "10.1.2.3", Host: "h2"},
	}
	if err := h.SetNetworkPorts(ctx, ports); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitServing(ctx, n.Gateway()); err != nil {
		t.Fatal(err)
	}
	ask := func(name string) *dns.Msg {
		t.Helper()
		var resp *dns.Msg
		if err := g.Do(func() (err error) {
			c := &dns.Client{Net: "udp", Timeout: 5 * time.Second}
			m := new(dns.Msg)
			m.SetQuestion(dns.Fqdn(name), dns.TypeA)
			resp, _, err = c.Exchange(m, netip.AddrPortFrom(n.Gateway(), 53).String())
			return err
		}); err != nil {
			t.Fatalf("ask %s: %v", name, err)
		}
		return resp
	}
	for name, want := range map[string]netip.Addr{"remote1": n.AddrOf(5), "remote1.minicloud.internal": n.AddrOf(5), "local1": n.AddrOf(0)} {
		m := ask(name)
		if m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 || m.Answer[0].(*dns.A).A.String() != want.String() {
			t.Errorf("%s: %v, want A %s", name, m, want)
		}
	}
	if m := ask("elsewhere.minicloud.internal"); m.Rcode != dns.RcodeNameError {
		t.Errorf("a VM of another network resolved: %v", m)
	}
}
