package agent

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"

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

// countingForwards is a network manager that counts reads of the host's
// forwards.
type countingForwards struct {
	network.Manager
	mu    sync.Mutex
	lists int
}

func (c *countingForwards) ListPortForwards(ctx context.Context) ([]network.PortForward, error) {
	c.mu.Lock()
	c.lists++
	c.mu.Unlock()
	return c.Manager.ListPortForwards(ctx)
}

func (c *countingForwards) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lists
}

// TestANewVMReadsForwardsOnlyIfItHasSome: a new VM arriving on the
// assignment stream is queued, and the host's forwards are read (and
// programmed) only when its spec has some; a spec write of a known VM
// still syncs them.
func TestANewVMReadsForwardsOnlyIfItHasSome(t *testing.T) {
	var cf *countingForwards
	h := startHarness(t, nil, nil, func(d *Deps) {
		cf = &countingForwards{Manager: d.Network}
		d.Network = cf
	})
	ctx := context.Background()
	plain := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	exposed := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.updateSpec(exposed, func(s *minicloudv1.VMSpec) {
		s.PortForwards = []*minicloudv1.PortForward{{HostPort: 20080, GuestPort: 80}}
	})
	vms := map[string]*minicloudv1.VM{plain: h.vm(plain), exposed: h.vm(exposed)}
	h.a.mu.Lock()
	clear(h.a.assigned)
	h.a.mu.Unlock()
	// Each stream starts with its BOOKMARK (an empty set so far), whose
	// full sync reads the forwards once.
	before := cf.count()
	h.stream(1, bookmark, added(vms[plain], nil))
	if got := cf.count() - before - 1; got != 0 {
		t.Errorf("a new VM without forwards read the forwards %d times, want 0", got)
	}
	h.a.queue.mu.Lock()
	queued := h.a.queue.queued[plain]
	h.a.queue.mu.Unlock()
	if h.vm(plain) == nil || !queued {
		t.Fatal("the new VM was not assigned and queued")
	}
	before = cf.count()
	h.stream(1, bookmark, added(vms[exposed], nil))
	if got := cf.count() - before - 1; got != 1 {
		t.Errorf("a new VM with a forward read the forwards %d times, want 1", got)
	}
	fs, err := cf.ListPortForwards(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 1 || fs[0].VMID != exposed || fs[0].HostPort != 20080 {
		t.Fatalf("forwards %v, want the new VM's 20080", fs)
	}
	before = cf.count()
	unexposed := proto.CloneOf(vms[exposed])
	unexposed.Spec.PortForwards = nil
	unexposed.Meta.ResourceVersion++
	h.stream(1, bookmark, &minicloudv1.AssignmentEvent{Type: minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, Vm: unexposed})
	if got := cf.count() - before - 1; got != 1 {
		t.Errorf("a spec write read the forwards %d times, want 1", got)
	}
	if fs, err = cf.ListPortForwards(ctx); err != nil {
		t.Fatal(err)
	}
	if len(fs) != 0 {
		t.Fatalf("forwards after the unexpose %v, want none", fs)
	}
}
