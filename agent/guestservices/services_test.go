package guestservices

import (
	"context"
	"net/netip"
	"slices"
	"testing"

	"github.com/minicloud/minicloud/agent"
	"github.com/minicloud/minicloud/agent/guestservices/dhcpserver"
	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/metadata"
)

// A bridge name no host has: SetGuests must keep leases and zones for it
// (the bridge appears later) without root.
const bridge = "mc-ffeeddcc"

func guest(id, ip, mac string) agent.Guest {
	return agent.Guest{VM: &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: id, Name: "vm-" + id[:4]},
		Spec: &minicloudv1.VMSpec{},
		Status: &minicloudv1.VMStatus{Addresses: []*minicloudv1.VMAddress{{
			Network: "default", Bridge: bridge, Ip: ip, PrefixLength: 24, Gateway: "10.99.0.1", Mac: mac,
		}}},
	}}
}

func TestSetGuestsFeedsEveryServiceAndForgets(t *testing.T) {
	dir := metadata.NewDirectory()
	md, err := metadata.NewServer(dir, metadata.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := New(dir, md, dhcpserver.New(), dnsserver.New())
	ctx := context.Background()

	a := guest("0a000000-0000-4000-8000-000000000001", "10.99.0.5", "52:54:00:00:00:05")
	b := guest("0b000000-0000-4000-8000-000000000002", "10.99.0.6", "52:54:00:00:00:06")
	bad := guest("0c000000-0000-4000-8000-000000000003", "10.99.0.7", "not-a-mac")
	if err := s.SetGuests(ctx, []agent.Guest{a, b, bad}); err == nil {
		t.Errorf("SetGuests with an unparsable address: no error")
	}
	for _, g := range []agent.Guest{a, b} {
		ip := netip.MustParseAddr(g.VM.Status.Addresses[0].Ip)
		inst, ok := dir.Lookup(bridge, ip)
		if !ok || inst.ID != g.VM.Meta.Id {
			t.Errorf("metadata directory: %s on %s = %v, %v; want %s", ip, bridge, inst, ok, g.VM.Meta.Id)
		}
	}
	if dir.Len() != 2 {
		t.Errorf("directory holds %d instances, want the 2 valid ones", dir.Len())
	}
	if got := s.Bridges(); !slices.Equal(got, []string{bridge}) {
		t.Errorf("bridges = %v, want [%s]", got, bridge)
	}

	if err := s.SetGuests(ctx, []agent.Guest{a}); err != nil {
		t.Fatal(err)
	}
	if _, ok := dir.Get(b.VM.Meta.Id); ok || dir.Len() != 1 {
		t.Errorf("a guest left out of the set is still in the directory")
	}
	if err := s.SetGuests(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if len(s.Bridges()) != 0 || dir.Len() != 0 {
		t.Errorf("after an empty set: bridges %v, %d instances", s.Bridges(), dir.Len())
	}
}
