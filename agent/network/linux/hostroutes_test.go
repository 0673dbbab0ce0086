package linux

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestBridgeRefusedOverAHostRoute, in a namespace of its own: a network
// whose CIDR overlaps a route of the host (here a management interface
// with 10.77.0.0/16, and a static route to 10.78.4.0/24) or a protected
// network gets no bridge and no rules; one next to them does; and a
// bridge that exists already is kept when such a route appears later.
func TestBridgeRefusedOverAHostRoute(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	name, _ := networktest.Names()
	ns := netnstest.NewNS(t, "mcr-"+name[3:])
	m := &inNS{ns: ns, m: New(WithProtectedNets(netip.MustParsePrefix("10.79.0.0/24")))}
	if err := ns.Do(func() error {
		// A veth: this kernel has no dummy links.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mgmt0"}, PeerName: "mgmt0p"}); err != nil {
			return err
		}
		mgmt, err := netlink.LinkByName("mgmt0")
		if err != nil {
			return err
		}
		for _, n := range []string{"mgmt0", "mgmt0p"} {
			if l, err := netlink.LinkByName(n); err != nil || netlink.LinkSetUp(l) != nil {
				return fmt.Errorf("bring up %s: %v", n, err)
			}
		}
		if err := netlink.LinkSetUp(mgmt); err != nil {
			return err
		}
		if err := netlink.AddrAdd(mgmt, &netlink.Addr{IPNet: toIPNet(netip.MustParsePrefix("10.77.0.5/16"))}); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: mgmt.Attrs().Index, Dst: toIPNet(netip.MustParsePrefix("10.78.4.0/24")),
			Gw: netip.MustParseAddr("10.77.0.1").AsSlice()})
	}); err != nil {
		t.Fatal(err)
	}
	bridge := func(i int, cidr string) network.BridgeSpec {
		return network.BridgeSpec{Name: name[:len(name)-1] + string(rune('a'+i)), GatewayCIDR: netip.MustParsePrefix(cidr)}
	}
	for i, tc := range []struct{ gw, route, via string }{
		{"10.77.3.1/24", "10.77.0.0/16", "dev mgmt0"},
		{"10.76.0.1/15", "10.77.0.0/16", "dev mgmt0"},
		{"10.78.4.1/26", "10.78.4.0/24", "via 10.77.0.1 dev mgmt0"},
		{"10.79.0.1/24", "10.79.0.0/24", "--protected-nets"},
	} {
		err := m.EnsureBridge(ctx, bridge(i, tc.gw))
		var hc *network.HostConflictError
		if !errors.As(err, &hc) || hc.Route.String() != tc.route || hc.Via != tc.via {
			t.Errorf("bridge for %s: %v, want refused for the route to %s (%s)", tc.gw, err, tc.route, tc.via)
		}
	}
	if bs, err := m.ListBridges(ctx); err != nil || len(bs) != 0 {
		t.Fatalf("bridges after refusals: %v %v", bs, err)
	}
	ruleset, err := exec.Command("ip", "netns", "exec", ns.Name, "nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset: %v\n%s", err, ruleset)
	}
	for i := range 4 {
		if b := bridge(i, "10.0.0.1/24").Name; strings.Contains(string(ruleset), b) {
			t.Errorf("rules left for refused bridge %s:\n%s", b, ruleset)
		}
	}
	ok := bridge(5, "10.80.0.1/24")
	if err := m.EnsureBridge(ctx, ok); err != nil {
		t.Fatalf("a network next to the host's routes: %v", err)
	}
	// A route that appears later does not take an existing bridge down.
	if err := ns.Do(func() error {
		l, err := netlink.LinkByName("mgmt0")
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: toIPNet(netip.MustParsePrefix("10.80.0.0/16")),
			Gw: netip.MustParseAddr("10.77.0.1").AsSlice()})
	}); err != nil {
		t.Fatal(err)
	}
	if err := m.EnsureBridge(ctx, ok); err != nil {
		t.Fatalf("an existing bridge after an overlapping route appeared: %v", err)
	}
}
