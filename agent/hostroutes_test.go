package agent

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestReconcileRefusesANetworkOverlappingAHostRoute: the host routes
// 10.88.0.0/16 itself (its management network, say), so the VM's network
// 10.88.0.0/24 gets no bridge here: the VM says why (condition and
// warning event), and after the usual attempts goes back to the scheduler
// — while the host's routing is left as it was.
func TestReconcileRefusesANetworkOverlappingAHostRoute(t *testing.T) {
	h := newHarness(t)
	h.net.SetRoutes(map[netip.Prefix]string{netip.MustParsePrefix("10.88.0.0/16"): "eth1"})
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	_, err := h.pass(id)
	var hc *network.HostConflictError
	if !errors.As(err, &hc) || hc.Route != netip.MustParsePrefix("10.88.0.0/16") {
		t.Fatalf("reconcile: %v, want the host-route conflict", err)
	}
	c := condition(h.vm(id), "NetworkReady")
	if c == nil || c.GetStatus() || c.GetReason() != "NetworkOverlapsHost" || !strings.Contains(c.GetMessage(), "10.88.0.0/16 (dev eth1)") {
		t.Fatalf("NetworkReady = %v, want false/NetworkOverlapsHost naming the route", c)
	}
	ev := h.api.last(id).GetEvents()
	if len(ev) != 1 || ev[0].GetReason() != "NetworkOverlapsHost" || ev[0].GetType() != "Warning" {
		t.Fatalf("events %v, want one NetworkOverlapsHost warning", ev)
	}
	bridges, err := networktest.NewFakeManager(h.net).ListBridges(context.Background())
	if err != nil || len(bridges) != 0 || len(h.ports(id)) != 0 || h.domain(id).Exists {
		t.Fatalf("something was built: bridges %v (%v), ports %v, domain %+v", bridges, err, h.ports(id), h.domain(id))
	}
	for range createAttemptsBeforeReschedule - 1 {
		_, _ = h.pass(id)
	}
	if r := h.api.last(id); !r.GetReschedule() {
		t.Fatalf("last report %v, want the VM given back to the scheduler", r)
	}

	// A bridge that exists already is kept even if such a route appears
	// later: tearing it down would cut its guests off.
	h2 := newHarness(t)
	id2 := h2.running()
	h2.net.SetRoutes(map[netip.Prefix]string{netip.MustParsePrefix("10.88.0.0/16"): "eth1"})
	h2.mustPass(id2)
	if !h2.domain(id2).Running {
		t.Fatal("a running VM was disturbed by a new host route")
	}
}
