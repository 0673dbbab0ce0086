package dhcpserver

import (
	"net"
	"net/netip"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv4"
)

// TestAnswer covers the decision table without sockets; the namespace tests
// in server_test.go cover the wire.
func TestAnswer(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}
	gw := netip.MustParseAddr("10.88.0.1")
	s := New()
	if err := s.SetLeases("mc-test", []Lease{{MAC: mac, Address: netip.MustParsePrefix("10.88.0.5/24"), Gateway: gw}}); err != nil {
		t.Fatal(err)
	}
	msg := func(typ dhcpv4.MessageType, hw net.HardwareAddr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
		m, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithMessageType(typ), dhcpv4.WithHwAddr(hw)}, mods...)...)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	other := net.HardwareAddr{0x52, 0x54, 0, 9, 9, 9}
	for _, tc := range []struct {
		name   string
		bridge string
		req    *dhcpv4.DHCPv4
		want   dhcpv4.MessageType // MessageTypeNone: no answer
	}{
		{"discover", "mc-test", msg(dhcpv4.MessageTypeDiscover, mac), dhcpv4.MessageTypeOffer},
		{"discover from unknown MAC", "mc-test", msg(dhcpv4.MessageTypeDiscover, other), dhcpv4.MessageTypeNone},
		{"known MAC on another bridge", "mc-other", msg(dhcpv4.MessageTypeDiscover, mac), dhcpv4.MessageTypeNone},
		{"request for its address", "mc-test", msg(dhcpv4.MessageTypeRequest, mac,
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 88, 0, 5))),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(gw.AsSlice()))), dhcpv4.MessageTypeAck},
		{"renewal from its address", "mc-test", msg(dhcpv4.MessageTypeRequest, mac,
			dhcpv4.WithClientIP(net.IPv4(10, 88, 0, 5))), dhcpv4.MessageTypeAck},
		{"request for another address", "mc-test", msg(dhcpv4.MessageTypeRequest, mac,
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 88, 0, 6)))), dhcpv4.MessageTypeNak},
		{"request to another server", "mc-test", msg(dhcpv4.MessageTypeRequest, mac,
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.IPv4(10, 88, 0, 254)))), dhcpv4.MessageTypeNone},
		{"through a (forged) relay", "mc-test", msg(dhcpv4.MessageTypeDiscover, mac,
			dhcpv4.WithGatewayIP(net.IPv4(10, 88, 0, 9))), dhcpv4.MessageTypeNone},
		{"release", "mc-test", msg(dhcpv4.MessageTypeRelease, mac), dhcpv4.MessageTypeNone},
		{"inform", "mc-test", msg(dhcpv4.MessageTypeInform, mac), dhcpv4.MessageTypeNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := s.answer(tc.bridge, tc.req)
			got := dhcpv4.MessageTypeNone
			if r != nil {
				got = r.MessageType()
			}
			if got != tc.want {
				t.Fatalf("answer = %v, want %v", got, tc.want)
			}
			if got == dhcpv4.MessageTypeOffer || got == dhcpv4.MessageTypeAck {
				if !r.YourIPAddr.Equal(net.IPv4(10, 88, 0, 5)) || !r.ServerIdentifier().Equal(gw.AsSlice()) {
					t.Errorf("reply yiaddr %s server id %s", r.YourIPAddr, r.ServerIdentifier())
				}
				if r.IPAddressLeaseTime(0) != DefaultLeaseTime {
					t.Errorf("lease time %v, want the default %v", r.IPAddressLeaseTime(0), DefaultLeaseTime)
				}
			}
		})
	}
}

func TestSetLeasesSkipsInvalid(t *testing.T) {
	s := New()
	mac := net.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}
	err := s.SetLeases("mc-test", []Lease{
		{MAC: mac, Address: netip.MustParsePrefix("10.88.0.5/24"), Gateway: netip.MustParseAddr("10.88.0.1")},
		{MAC: net.HardwareAddr{1, 2}, Address: netip.MustParsePrefix("10.88.0.6/24"), Gateway: netip.MustParseAddr("10.88.0.1")},
		{MAC: net.HardwareAddr{0x52, 0x54, 0, 1, 2, 4}, Gateway: netip.MustParseAddr("10.88.0.1")},
	})
	if err == nil {
		t.Fatal("invalid leases: want an error")
	}
	if got := len(s.Leases("mc-test")); got != 1 {
		t.Fatalf("%d leases kept, want the 1 valid one", got)
	}
	if err := s.SetLeases("mc-test", nil); err != nil {
		t.Fatal(err)
	}
	if len(s.Leases("mc-test")) != 0 {
		t.Fatal("empty SetLeases left the bridge served")
	}
}

// TestAnswerOptions: an ACK carries everything a guest configures its
// network from (dhclient, systemd-networkd, udhcpc): mask, router, DNS,
// domain and search domain, MTU, host name; and on a network without a
// default route, no router but a classless static route to the metadata
// address.
func TestAnswerOptions(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}
	gw := netip.MustParseAddr("10.88.0.1")
	base := Lease{MAC: mac, Address: netip.MustParsePrefix("10.88.0.5/24"), Gateway: gw,
		DNS: []netip.Addr{gw}, MTU: 1450, Hostname: "web1", Domain: "minicloud.internal"}
	isolated := base
	isolated.NoDefaultRoute = true
	for _, tc := range []struct {
		name  string
		lease Lease
	}{{"with router", base}, {"no default route", isolated}} {
		t.Run(tc.name, func(t *testing.T) {
			s := New()
			if err := s.SetLeases("mc-test", []Lease{tc.lease}); err != nil {
				t.Fatal(err)
			}
			req, err := dhcpv4.New(dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithHwAddr(mac),
				dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 88, 0, 5))))
			if err != nil {
				t.Fatal(err)
			}
			// Decode the reply from the wire, as a client would.
			r, err := dhcpv4.FromBytes(s.answer("mc-test", req).ToBytes())
			if err != nil {
				t.Fatal(err)
			}
			if r.MessageType() != dhcpv4.MessageTypeAck {
				t.Fatalf("answer %v, want ACK", r.MessageType())
			}
			if got := r.SubnetMask(); !net.IP(got).Equal(net.IPv4(255, 255, 255, 0)) {
				t.Errorf("subnet mask %v", got)
			}
			if dns := r.DNS(); len(dns) != 1 || !dns[0].Equal(gw.AsSlice()) {
				t.Errorf("DNS %v, want [%s]", dns, gw)
			}
			if got := r.DomainName(); got != "minicloud.internal" {
				t.Errorf("domain name (15) %q", got)
			}
			if got := r.DomainSearch(); got == nil || len(got.Labels) != 1 || got.Labels[0] != "minicloud.internal" {
				t.Errorf("domain search (119) %v", got)
			}
			if mtu, err := dhcpv4.GetUint16(dhcpv4.OptionInterfaceMTU, r.Options); err != nil || mtu != 1450 {
				t.Errorf("interface MTU (26) %d (%v)", mtu, err)
			}
			if got := r.HostName(); got != "web1" {
				t.Errorf("host name (12) %q", got)
			}
			routers, routes := r.Router(), r.ClasslessStaticRoute()
			if !tc.lease.NoDefaultRoute {
				if len(routers) != 1 || !routers[0].Equal(gw.AsSlice()) {
					t.Errorf("router (3) %v, want [%s]", routers, gw)
				}
				if routes != nil {
					t.Errorf("classless static routes (121) %v with a router: the client would ignore option 3", routes)
				}
				return
			}
			if routers != nil {
				t.Errorf("router (3) %v on a network without a default route", routers)
			}
			if len(routes) != 1 || routes[0].Dest.String() != "169.254.169.254/32" || !routes[0].Router.Equal(gw.AsSlice()) {
				t.Errorf("classless static routes (121) %v, want 169.254.169.254/32 via %s", routes, gw)
			}
		})
	}
}

// TestUpsertAndRemoveLease: one lease changes, the bridge's others stay
// answered; the last one gone, the bridge is not served.
func TestUpsertAndRemoveLease(t *testing.T) {
	s := New()
	gw := netip.MustParseAddr("10.88.0.1")
	a, b := net.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, net.HardwareAddr{0x52, 0x54, 0, 1, 2, 4}
	discover := func(hw net.HardwareAddr) *dhcpv4.DHCPv4 {
		m, err := dhcpv4.NewDiscovery(hw)
		if err != nil {
			t.Fatal(err)
		}
		return s.answer("mc-test", m)
	}
	for i, mac := range []net.HardwareAddr{a, b} {
		if err := s.UpsertLease("mc-test", Lease{MAC: mac, Address: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 88, 0, byte(5 + i)}), 24), Gateway: gw}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.UpsertLease("mc-test", Lease{MAC: a, Address: netip.MustParsePrefix("10.88.0.9/24"), Gateway: gw}); err != nil {
		t.Fatal(err)
	}
	if r := discover(a); r == nil || !r.YourIPAddr.Equal(net.IPv4(10, 88, 0, 9)) {
		t.Fatalf("offer after an update = %v, want 10.88.0.9", r)
	}
	if err := s.UpsertLease("mc-test", Lease{MAC: net.HardwareAddr{1}, Gateway: gw}); err == nil {
		t.Error("invalid lease accepted")
	}
	s.RemoveLease("mc-test", a)
	if r := discover(a); r != nil {
		t.Errorf("removed lease still answered: %v", r)
	}
	if r := discover(b); r == nil || !r.YourIPAddr.Equal(net.IPv4(10, 88, 0, 6)) {
		t.Errorf("the other lease after a removal = %v, want 10.88.0.6", r)
	}
	s.RemoveLease("mc-test", b)
	if ls := s.Leases("mc-test"); len(ls) != 0 {
		t.Errorf("leases after removing both: %v", ls)
	}
	s.RemoveLease("mc-gone", a) // unknown: ignored
}
