package linux

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// newMemoHost is a Manager in a network namespace of its own (also as
// network.Manager, m) and the spec of a NAT'd network's bridge there.
func newMemoHost(t *testing.T) (host *netnstest.NS, mgr *Manager, m *inNS, bridge network.BridgeSpec, tap func(int) string) {
	netnstest.Require(t)
	br, tap := networktest.Names()
	host = netnstest.NewNS(t, "mch-"+br)
	mgr = New()
	bridge = network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16"), NAT: true}
	return host, mgr, &inNS{ns: host, m: mgr}, bridge, tap
}

// readingsNow is how many times the Manager has read the ruleset.
func (m *Manager) readingsNow() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.readings
}

// baseReadsNow is how many times the Manager has read the static ruleset.
func (m *Manager) baseReadsNow() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.baseReads
}

// TestConvergedRulesAreReadAgainOnlyAfterACommit: once a bridge's and a
// port's rules were found converged, ensuring them again reads nothing of
// the ruleset while its generation stays; a commit by someone else (here
// the port's filter removed behind the Manager's back) moves the
// generation, and the next EnsurePort reads the sets again and puts the
// filter back.
func TestConvergedRulesAreReadAgainOnlyAfterACommit(t *testing.T) {
	ctx := context.Background()
	host, mgr, m, bridge, tap := newMemoHost(t)
	br := bridge.Name
	port := scalePort(br, tap, 1)
	ensure := func() {
		t.Helper()
		if err := m.EnsureBridge(ctx, bridge); err != nil {
			t.Fatal(err)
		}
		if err := m.EnsurePort(ctx, port); err != nil {
			t.Fatal(err)
		}
	}
	readings := mgr.readingsNow
	filter := func() portFilter {
		t.Helper()
		var f portFilter
		err := host.Do(func() error {
			b, err := newBatch(nil)
			if err != nil {
				return err
			}
			filters, err := b.portFilters()
			f = filters[port.TapName]
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return f
	}

	ensure() // creates: a commit, so not remembered as converged
	ensure() // finds both converged: remembered
	before := readings()
	ensure()
	ensure()
	if got := readings(); got != before {
		t.Fatalf("converged bridge and port at an unchanged generation: %d ruleset reads, want none", got-before)
	}

	// Someone else's transaction: the port's filter elements removed.
	err := host.Do(func() error {
		b, err := newBatch(nil)
		if err != nil {
			return err
		}
		if err := b.portElements(port.TapName, nil, netip.Addr{}); err != nil {
			return err
		}
		return b.flush("remove the filter behind the Manager's back")
	})
	if err != nil {
		t.Fatal(err)
	}
	if f := filter(); f.ip.IsValid() || f.mac != nil {
		t.Fatalf("filter still there after its removal: %+v", f)
	}
	ensure()
	if readings() == before {
		t.Fatal("the ruleset changed but EnsurePort did not read it again")
	}
	if f := filter(); f.ip != port.IP || f.mac.String() != port.MAC.String() {
		t.Fatalf("filter after EnsurePort: %+v, want %s %s", f, port.MAC, port.IP)
	}
}

// TestGenIDSkipsOtherAttributes: NFTA_GEN_ID is found among the answer's
// attributes whatever their order, and a truncated answer is refused.
func TestGenIDSkipsOtherAttributes(t *testing.T) {
	msg := []byte{0, 0, 0, 0, // nfgenmsg
		8, 0, 2, 0, 0, 0, 0, 42, // NFTA_GEN_PROC_PID
		8, 0, 1, 0, 0, 0, 1, 2, // NFTA_GEN_ID 258
	}
	if gen, ok := genID(msg); !ok || gen != 258 {
		t.Fatalf("genID = %d, %v; want 258, true", gen, ok)
	}
	if _, ok := genID(msg[:14]); ok {
		t.Fatal("genID accepted a truncated answer")
	}
}

// TestOwnCommitsKeepTheBridgeConverged: the ports this Manager writes move
// the ruleset's generation, but the bridge it converged is not read again
// for them (the next VM of a network does not wait for a second bridge
// check); a commit by anyone else in between still makes the next check
// read everything and repair what was changed (here the network's NAT
// rule, deleted behind the Manager's back).
func TestOwnCommitsKeepTheBridgeConverged(t *testing.T) {
	ctx := context.Background()
	host, mgr, m, bridge, tap := newMemoHost(t)
	br := bridge.Name
	readings := mgr.readingsNow
	ensureBridge := func(wantReads bool, why string) {
		t.Helper()
		before := readings()
		if err := m.EnsureBridge(ctx, bridge); err != nil {
			t.Fatal(err)
		}
		if read := readings() != before; read != wantReads {
			t.Errorf("%s: bridge check read the ruleset: %v, want %v", why, read, wantReads)
		}
	}
	nft := func(args ...string) string {
		t.Helper()
		out, err := host.Command(ctx, "nft", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("nft %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	ensureBridge(true, "a new bridge")
	ensureBridge(false, "right after it was made")
	for i := range 3 {
		if err := m.EnsurePort(ctx, scalePort(br, tap, i)); err != nil {
			t.Fatal(err)
		}
		ensureBridge(false, fmt.Sprintf("after the Manager's own port %d", i))
	}
	if err := m.DeletePort(ctx, scalePort(br, tap, 1).TapName); err != nil {
		t.Fatal(err)
	}
	ensureBridge(false, "after the Manager's own port delete")

	nat := `ip saddr 10.230.0.0/16 oifname != "` + br + `"`
	nft("flush", "chain", "inet", tableName, chainPostrouting)
	ensureBridge(true, "after someone else's commit")
	if rules := nft("list", "chain", "inet", tableName, chainPostrouting); !strings.Contains(rules, nat) {
		t.Errorf("NAT rule not restored:\n%s", rules)
	}
	// Someone else's commit while the Manager's own transaction is being
	// built: the generation then moves by two, and nothing is carried.
	err := host.Do(func() error {
		mgr.mu.Lock()
		defer mgr.mu.Unlock()
		_, err := mgr.applyChanges("a filter, someone else's commit in between", false, func(b *batch) error {
			outside, err := newBatch(nil)
			if err != nil {
				return err
			}
			p := scalePort(br, tap, 7)
			if err := outside.portElements(p.TapName, p.MAC, p.IP); err != nil {
				return err
			}
			if err := outside.flush("someone else's filter"); err != nil {
				return err
			}
			p = scalePort(br, tap, 8)
			return b.portElements(p.TapName, p.MAC, p.IP)
		})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	ensureBridge(true, "after an own commit with someone else's in between")
	// Another Manager (a restarted agent's) on the same host is someone
	// else too.
	other := &inNS{ns: host, m: New()}
	if err := other.EnsurePort(ctx, scalePort(br, tap, 5)); err != nil {
		t.Fatal(err)
	}
	ensureBridge(true, "after another Manager's commit")
}

// TestANewBridgeTrustsABaseReadAtThisGeneration: a network's first VM makes
// its bridge, and the tables, chains, sets and static rules all bridges
// share are not read again for it while only this Manager has written
// the ruleset; after someone else's commit (a static chain flushed) they
// are read, and repaired, before the next bridge.
func TestANewBridgeTrustsABaseReadAtThisGeneration(t *testing.T) {
	ctx := context.Background()
	host, mgr, m, bridge, _ := newMemoHost(t)
	if err := m.EnsureBridge(ctx, bridge); err != nil {
		t.Fatal(err)
	}
	second := network.BridgeSpec{Name: bridge.Name + "x", GatewayCIDR: netip.MustParsePrefix("10.231.0.1/24"), NAT: true}
	newBridge := func(wantBaseRead bool, why string) {
		t.Helper()
		before := mgr.baseReadsNow()
		if err := m.EnsureBridge(ctx, second); err != nil {
			t.Fatal(err)
		}
		if read := mgr.baseReadsNow() != before; read != wantBaseRead {
			t.Errorf("%s: static ruleset read: %v, want %v", why, read, wantBaseRead)
		}
		if err := m.DeleteBridge(ctx, second.Name); err != nil {
			t.Fatal(err)
		}
	}
	newBridge(false, "a second bridge")
	newBridge(false, "a third, after the Manager's own delete")

	rules := countRules(t, host)
	if out, err := host.Command(ctx, "nft", "flush", "chain", "bridge", tableName, chainPrerouting).CombinedOutput(); err != nil {
		t.Fatalf("nft flush chain: %v: %s", err, out)
	}
	newBridge(true, "after someone else's commit")
	if got := countRules(t, host); got != rules {
		t.Errorf("static rules after the repair: %d, want %d", got, rules)
	}
}
