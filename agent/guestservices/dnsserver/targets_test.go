package dnsserver

import (
	"net/netip"
	"slices"
	"testing"
)

func TestNeverForwardsToItself(t *testing.T) {
	gw := netip.MustParseAddr("10.88.0.1")
	up := netip.MustParseAddrPort("127.0.0.53:53")
	s := New(WithUpstreams(
		netip.AddrPortFrom(gw, 53), netip.AddrPortFrom(MetadataAddr, 53),
		netip.MustParseAddrPort("0.0.0.0:53"), up))
	if err := s.SetZone("mc-test", Zone{Listen: gw}); err != nil {
		t.Fatal(err)
	}
	if got := s.forwardTargets(); !slices.Equal(got, []netip.AddrPort{up}) {
		t.Fatalf("forward targets = %v, want only %s", got, up)
	}
}
