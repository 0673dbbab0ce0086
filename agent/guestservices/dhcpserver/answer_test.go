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
	if got := len((*s.snapshot.Load())["mc-test"]); got != 1 {
		t.Fatalf("%d leases kept, want the 1 valid one", got)
	}
	if err := s.SetLeases("mc-test", nil); err != nil {
		t.Fatal(err)
	}
	if _, ok := (*s.snapshot.Load())["mc-test"]; ok {
		t.Fatal("empty SetLeases left the bridge served")
	}
}
