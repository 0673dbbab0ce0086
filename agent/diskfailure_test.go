package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network/linux"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/netnstest"
	"github.com/minicloud/minicloud/pkg/nic"
)

// TestDiskFailureLeavesNothingOnTheHost: the disk and the network of a
// create run at once (converge), so a VM whose disk fails already has its
// bridge, tap and nftables rules. Whatever the failure, none of it may
// outlive what the VM still holds on this host:
//   - a permanent failure: ERROR at once, its tap and rules gone at once;
//     its address, name and lease stay (served as assigned, like a stopped
//     VM's: `vm start` retries it here) until it is deleted, and then the
//     bridge goes too;
//   - a failure that keeps coming back: retried with its tap kept, then
//     given back to the scheduler with nothing left, bridge included;
//   - a failing VM deleted before its retry: nothing left.
//
// Real bridge, taps and nftables rules of this host (the Linux network
// manager, as linuxtest uses it), names and subnet random; the hypervisor,
// the API and the guest services are the fakes of reconcile_test.go (the
// served guests are the leases).
func TestDiskFailureLeavesNothingOnTheHost(t *testing.T) {
	netnstest.Require(t)
	for _, tc := range []struct {
		name string
		err  error
		run  func(t *testing.T, r *diskFailureRig)
	}{
		{"permanent", errdefs.Invalid("image /x: the image looks like a VMDK image or descriptor"), func(t *testing.T, r *diskFailureRig) {
			if _, err := r.h.pass(r.id); err != nil {
				t.Fatalf("reconcile: %v, want the failure reported, not retried", err)
			}
			r.h.wantStatus(r.id, minicloudv1.VMPhase_VM_PHASE_ERROR, "ImageUnusable")
			r.noPort(t, "in ERROR")
			r.h.delete(r.id)
			r.h.mustPass(r.id)
			r.gone(t)
		}},
		{"keeps failing", errors.New("qemu-img: disk full"), func(t *testing.T, r *diskFailureRig) {
			for i := 1; i < createAttemptsBeforeReschedule; i++ {
				if _, err := r.h.pass(r.id); err == nil {
					t.Fatalf("attempt %d: reconcile succeeded with a failing disk", i)
				}
				// Kept for the retry: the next pass only checks them.
				if _, err := netlink.LinkByName(r.tap); err != nil {
					t.Fatalf("attempt %d: the tap made beside the failing disk is gone before the VM gave up: %v", i, err)
				}
			}
			if _, err := r.h.pass(r.id); err != nil {
				t.Fatalf("last attempt: %v, want the VM given back without error", err)
			}
			if !r.h.api.last(r.id).GetReschedule() {
				t.Fatalf("last report %v, want the VM given back to the scheduler", r.h.api.last(r.id))
			}
			r.noPort(t, "given back")
			r.gone(t)
		}},
		{"deleted before its retry", errors.New("qemu-img: disk full"), func(t *testing.T, r *diskFailureRig) {
			if _, err := r.h.pass(r.id); err == nil {
				t.Fatal("reconcile succeeded with a failing disk")
			}
			r.h.delete(r.id)
			r.h.mustPass(r.id)
			r.gone(t)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newDiskFailureRig(t)
			r.h.disks.fail(tc.err)
			tc.run(t, r)
		})
	}
}

// diskFailureRig is one VM on a network of its own, on an agent over this
// host's real network.
type diskFailureRig struct {
	h                *harness
	id, tap, bridge  string
	ip, mac, gateway string
}

func newDiskFailureRig(t *testing.T) *diskFailureRig {
	t.Helper()
	m := linux.New(linux.WithLogger(slog.New(slog.DiscardHandler)))
	h := startHarness(t, nil, nil, func(d *Deps) { d.Network = m })
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	// 10.240-250: clear of the lab's underlay (10.251.0.0/24) and of the
	// e2e clouds' 10.200-249 only by chance, hence the random third byte.
	net3 := fmt.Sprintf("10.%d.%d", 240+b[4]%11, b[5])
	r := &diskFailureRig{
		h: h, bridge: "mc-" + hex.EncodeToString(b[:4]),
		ip: net3 + ".5", gateway: net3 + ".1",
		mac: fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2]),
	}
	r.id = h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	r.tap = nic.TapName(r.id, 0)
	h.a.mu.Lock()
	h.a.assigned[r.id].vm.Status.Addresses = []*minicloudv1.VMAddress{{Network: "df", Bridge: r.bridge,
		Ip: r.ip, PrefixLength: 24, Gateway: r.gateway, Mac: r.mac}}
	h.a.mu.Unlock()
	t.Cleanup(func() {
		// Whatever the test left (it failed): off the machine.
		ctx := context.Background()
		if _, err := netlink.LinkByName(r.tap); err == nil {
			_ = m.DeletePort(ctx, r.tap)
		}
		if _, err := netlink.LinkByName(r.bridge); err == nil {
			_ = m.DeleteBridge(ctx, r.bridge)
		}
	})
	return r
}

// noPort checks the kernel for the VM's tap and for nftables rules naming
// its tap, MAC or address.
func (r *diskFailureRig) noPort(t *testing.T, when string) {
	t.Helper()
	if _, err := netlink.LinkByName(r.tap); err == nil {
		t.Errorf("%s: tap %s still exists", when, r.tap)
	}
	for _, s := range []string{r.tap, r.mac, r.ip} {
		if lines := nftLinesNaming(t, s); len(lines) > 0 {
			t.Errorf("%s: the nftables ruleset still names %s:\n%s", when, s, strings.Join(lines, "\n"))
		}
	}
}

// gone plays the assignment stream's DELETED event (the VM left the host)
// and its reconcile, then checks that nothing of the VM is left: no tap, no
// rule, no lease, no VM directory, and no bridge (no other VM used it).
func (r *diskFailureRig) gone(t *testing.T) {
	t.Helper()
	a := r.h.a
	a.mu.Lock()
	delete(a.assigned, r.id)
	delete(a.reported, r.id)
	a.guestsDirty[r.id] = true
	a.mu.Unlock()
	a.publishGuests(context.Background())
	r.h.mustPass(r.id)
	r.noPort(t, "after it left")
	if r.served() {
		t.Errorf("after it left: the guest services still serve the VM (its lease)")
	}
	if _, err := netlink.LinkByName(r.bridge); err == nil {
		t.Errorf("after it left: bridge %s, which no VM on this host uses, still exists", r.bridge)
	}
	if lines := nftLinesNaming(t, r.bridge); len(lines) > 0 {
		t.Errorf("after it left: the nftables ruleset still names bridge %s:\n%s", r.bridge, strings.Join(lines, "\n"))
	}
}

// served says whether the guest services serve the VM (DHCP lease, DNS
// name, metadata).
func (r *diskFailureRig) served() bool {
	for _, g := range r.h.guest.last() {
		if g.VM.GetMeta().GetId() == r.id {
			return true
		}
	}
	return false
}

// nftLinesNaming is the lines of this host's nftables ruleset that contain s.
func nftLinesNaming(t *testing.T, s string) []string {
	t.Helper()
	out, err := exec.Command("nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset: %v\n%s", err, out)
	}
	return slices.DeleteFunc(strings.Split(string(out), "\n"), func(l string) bool { return !strings.Contains(l, s) })
}
