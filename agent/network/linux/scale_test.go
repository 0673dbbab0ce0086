package linux

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

func countRules(t testing.TB, host *netnstest.NS) (rules int) {
	t.Helper()
	err := host.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		for _, ch := range newChains() {
			rs, err := c.GetRules(ch.Table, ch)
			if err != nil {
				return fmt.Errorf("chain %s: %w", ch.Name, err)
			}
			rules += len(rs)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return rules
}

func scalePort(bridge string, tap func(int) string, i int) network.PortSpec {
	return network.PortSpec{
		VMID: fmt.Sprintf("vm-%d", i), TapName: strings.TrimSuffix(tap(0), "0") + fmt.Sprintf("%02x", i),
		Bridge: bridge, MAC: net.HardwareAddr{0x52, 0x54, 0, 0, byte(i >> 8), byte(i)},
		IP: netip.AddrFrom4([4]byte{10, 230, byte(i >> 8), byte(10 + i)}),
	}
}

// TestRulesetSizeIndependentOfPorts checks the design promise: ports are set
// elements, never rules, so the ruleset does not grow with the VM count.
func TestRulesetSizeIndependentOfPorts(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	br, tap := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+br)
	m := &inNS{ns: host, m: New()}
	if err := m.EnsureBridge(ctx, network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16"), NAT: true}); err != nil {
		t.Fatal(err)
	}
	before := countRules(t, host)
	const ports = 40
	var specs []network.PortSpec
	for i := 0; i < ports; i++ {
		p := scalePort(br, tap, i)
		specs = append(specs, p)
		if err := m.EnsurePort(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if after := countRules(t, host); after != before {
		t.Errorf("rules: %d with no port, %d with %d ports", before, after, ports)
	}
	got, err := m.ListPorts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != ports {
		t.Fatalf("ListPorts: %d ports, want %d", len(got), ports)
	}
	if err := m.Sync(ctx, []network.BridgeSpec{{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16"), NAT: true}}, specs[:ports/2]); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.ListPorts(ctx); len(got) != ports/2 {
		t.Fatalf("after Sync: %d ports, want %d", len(got), ports/2)
	}
}

// BenchmarkEnsurePort measures creating a filtered tap (create, rules,
// attach, up) and re-ensuring an existing one (measure only).
func BenchmarkEnsurePort(b *testing.B) {
	netnstest.Require(b)
	ctx := context.Background()
	br, tap := networktest.Names()
	host := netnstest.NewNS(b, "mch-"+br)
	m := &inNS{ns: host, m: New()}
	if err := m.EnsureBridge(ctx, network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16")}); err != nil {
		b.Fatal(err)
	}
	b.Run("create+delete", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			p := scalePort(br, tap, i%200)
			if err := m.EnsurePort(ctx, p); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := m.DeletePort(ctx, p.TapName); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
	p := scalePort(br, tap, 1)
	if err := m.EnsurePort(ctx, p); err != nil {
		b.Fatal(err)
	}
	b.Run("converged", func(b *testing.B) {
		for b.Loop() {
			if err := m.EnsurePort(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestRecoversDeletedTables: someone flushes our tables behind our back
// (nft flush ruleset); the next EnsurePort rebuilds them instead of failing.
func TestRecoversDeletedTables(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	br, tap := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+br)
	m := &inNS{ns: host, m: New()}
	spec := network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16")}
	if err := m.EnsureBridge(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := m.EnsurePort(ctx, scalePort(br, tap, 1)); err != nil {
		t.Fatal(err)
	}
	if out, err := host.Command(ctx, "nft", "flush", "ruleset").CombinedOutput(); err != nil {
		t.Fatalf("nft flush ruleset: %v: %s", err, out)
	}
	p := scalePort(br, tap, 2)
	if err := m.EnsurePort(ctx, p); err != nil {
		t.Fatalf("EnsurePort after the ruleset was flushed: %v", err)
	}
	got, err := m.ListPorts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range got {
		if g.TapName == p.TapName && g.IP != p.IP {
			t.Errorf("port %s filter IP = %s, want %s", p.TapName, g.IP, p.IP)
		}
	}
	if n := countRules(t, host); n == 0 {
		t.Error("static rules not rebuilt")
	}
}

// TestListPortsFindsInterruptedCreates: a tap created by a crashed agent
// before it got its alias and filter is still reported, and deletable.
func TestListPortsFindsInterruptedCreates(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	br, tap := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+br)
	m := &inNS{ns: host, m: New()}
	if out, err := host.Command(ctx, "ip", "tuntap", "add", "dev", tap(0), "mode", "tap").CombinedOutput(); err != nil {
		t.Fatalf("ip tuntap: %v: %s", err, out)
	}
	ps, err := m.ListPorts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || ps[0].TapName != tap(0) {
		t.Fatalf("ListPorts = %+v, want the orphan %s", ps, tap(0))
	}
	if err := m.Sync(ctx, nil, nil); err != nil {
		t.Fatal(err)
	}
	if ps, _ := m.ListPorts(ctx); len(ps) != 0 {
		t.Fatalf("after Sync: %+v", ps)
	}
}

// BenchmarkConvergedPass is the network half of an agent's reconcile pass
// at rest (agent/reconcile.go, ensureNetwork): EnsureBridge and EnsurePort
// of a port that is already converged, with N ports on the bridge, each
// ensured once since the last change (as at rest). Its cost must not grow
// with N (issue 15, section 4).
func BenchmarkConvergedPass(b *testing.B) {
	netnstest.Require(b)
	for _, n := range []int{10, 50, 200} {
		b.Run(fmt.Sprintf("ports=%d", n), func(b *testing.B) {
			ctx := context.Background()
			br, tap := networktest.Names()
			host := netnstest.NewNS(b, "mch-"+br)
			m := New()
			spec := network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16"), NAT: true}
			ports := make([]network.PortSpec, n)
			err := host.Do(func() error {
				if err := m.EnsureBridge(ctx, spec); err != nil {
					return err
				}
				for i := range ports {
					ports[i] = scalePort(br, tap, i)
					if err := m.EnsurePort(ctx, ports[i]); err != nil {
						return err
					}
				}
				// At rest every port has had a pass since the last
				// change on the host (the agent's resync): one here.
				for _, p := range ports {
					if err := m.EnsurePort(ctx, p); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			err = host.Do(func() error {
				for i := 0; b.Loop(); i++ {
					if err := m.EnsureBridge(ctx, spec); err != nil {
						return err
					}
					if err := m.EnsurePort(ctx, ports[i%n]); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}
