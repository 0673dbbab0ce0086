package agent

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestForwardsFollowAssignments: the host's forwards are exactly those of
// its assigned VMs' specs, whatever happened before (a forward of a VM
// that left, one whose target changed); another minicloud's forward on
// the same machine is left alone; teardown removes a deleted VM's.
func TestForwardsFollowAssignments(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	fm := networktest.NewFakeManager(h.net)
	list := func() string {
		t.Helper()
		fs, err := fm.ListPortForwards(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprint(fs)
	}
	ip := netip.MustParseAddr("10.88.0.5")
	a := h.running()
	b := h.running()
	h.updateSpec(a, func(s *minicloudv1.VMSpec) {
		s.PortForwards = []*minicloudv1.PortForward{{HostPort: 20080, GuestPort: 80},
			{Protocol: minicloudv1.PortProtocol_PORT_PROTOCOL_UDP, HostPort: 20053, GuestPort: 53}}
	})
	// Left behind by earlier runs: b's old forward (b has none now), and
	// one of a VM of another cloud on this machine.
	stale := network.PortForward{VMID: b, Protocol: "tcp", HostPort: 20090, GuestIP: ip, GuestPort: 90}
	foreign := network.PortForward{VMID: "not-ours", Protocol: "tcp", HostPort: 20100, GuestIP: ip, GuestPort: 22}
	for _, f := range []network.PortForward{stale, foreign} {
		if err := fm.EnsurePortForward(ctx, f); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.a.syncForwards(ctx); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprint([]network.PortForward{
		{VMID: a, Protocol: "tcp", HostPort: 20080, GuestIP: ip, GuestPort: 80}, foreign,
		{VMID: a, Protocol: "udp", HostPort: 20053, GuestIP: ip, GuestPort: 53},
	})
	if got := list(); got != want {
		t.Fatalf("forwards\n%s\nwant\n%s", got, want)
	}
	// A new target, and one forward unexposed.
	h.updateSpec(a, func(s *minicloudv1.VMSpec) {
		s.PortForwards = []*minicloudv1.PortForward{{HostPort: 20080, GuestPort: 8080}}
	})
	if err := h.a.syncForwards(ctx); err != nil {
		t.Fatal(err)
	}
	want = fmt.Sprint([]network.PortForward{{VMID: a, Protocol: "tcp", HostPort: 20080, GuestIP: ip, GuestPort: 8080}, foreign})
	if got := list(); got != want {
		t.Fatalf("forwards after the change\n%s\nwant\n%s", got, want)
	}
	// Delete: teardown removes the forward with the VM.
	h.delete(a)
	h.mustPass(a)
	if got, want := list(), fmt.Sprint([]network.PortForward{foreign}); got != want {
		t.Fatalf("forwards after delete %s, want %s", got, want)
	}
}
