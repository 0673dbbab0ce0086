package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor/hypervisortest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

func (h *harness) lastEvent(id string) *minicloudv1.Event {
	h.t.Helper()
	r := h.api.last(id)
	if r == nil || len(r.GetEvents()) == 0 {
		h.t.Fatalf("no event reported for %s (last report %v)", id, r)
	}
	return r.GetEvents()[len(r.GetEvents())-1]
}

func (h *harness) setPolicy(id string, p minicloudv1.RestartPolicy) {
	h.updateSpec(id, func(s *minicloudv1.VMSpec) { s.RestartPolicy = p })
	h.mustPass(id)
}

// TestRestartPolicy: a VM whose domain stopped without a request and
// without its guest shutting down (a crash, its QEMU gone with a host
// reboot) is started again under ON_FAILURE, the default — at most once a
// minute — and reported with the right reason under NEVER.
func TestRestartPolicy(t *testing.T) {
	for _, tc := range []struct {
		name, reason string
		stop         func(h *hypervisortest.FakeHost, vmID string)
	}{
		{"crash", lifecycle.ReasonCrashed, (*hypervisortest.FakeHost).GuestCrash},
		{"host reboot", lifecycle.ReasonStoppedUnexpectedly, (*hypervisortest.FakeHost).QEMUGone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			id := h.running()
			tc.stop(h.hv, id)
			h.mustPass(id)
			h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, "Running")
			if ev := h.lastEvent(id); ev.GetReason() != lifecycle.ReasonRestarted || !strings.Contains(ev.GetMessage(), "restart policy on-failure") {
				t.Fatalf("event %v, want Restarted", ev)
			}
			if !h.domain(id).Running {
				t.Fatal("domain not restarted")
			}
			// Again within the minute: reported, retried later.
			tc.stop(h.hv, id)
			res, err := h.pass(id)
			if err != nil {
				t.Fatal(err)
			}
			h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_STOPPED, tc.reason)
			if res.RequeueAfter <= 0 || res.RequeueAfter > restartInterval || !strings.Contains(h.vm(id).GetStatus().GetMessage(), "next attempt in") {
				t.Fatalf("requeue %v, message %q", res.RequeueAfter, h.vm(id).GetStatus().GetMessage())
			}
			if h.domain(id).Running {
				t.Fatal("restarted twice within the restart interval")
			}

			// NEVER: the stop is reported with its reason, not StoppedByGuest.
			h2 := newHarness(t)
			id2 := h2.running()
			h2.setPolicy(id2, minicloudv1.RestartPolicy_RESTART_POLICY_NEVER)
			tc.stop(h2.hv, id2)
			h2.mustPass(id2)
			h2.wantStatus(id2, minicloudv1.VMPhase_VM_PHASE_STOPPED, tc.reason)
			if h2.domain(id2).Running {
				t.Fatal("restarted under restart policy never")
			}
		})
	}
}

// runFenceLoop runs the agent's fence loop until the test (or stop) ends.
func (h *harness) runFenceLoop(fenceAfter time.Duration) (stop func()) {
	h.a.cfg.FenceAfter = fenceAfter
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = h.a.fenceLoop(ctx) }()
	stop = func() { cancel(); <-done }
	h.t.Cleanup(stop)
	return stop
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSelfFencing: without contact for FenceAfter, the agent destroys its
// domains and starts nothing; contact alone does not lift the fence, only
// a full assignment set on a stream opened after contact came back; then
// VMs still assigned start again (HostFenced), per their restart policy.
func TestSelfFencing(t *testing.T) {
	h := newHarness(t)
	again, never := h.running(), h.running()
	h.setPolicy(never, minicloudv1.RestartPolicy_RESTART_POLICY_NEVER)
	reports := h.api.count(again)

	stop := h.runFenceLoop(300 * time.Millisecond)
	waitFor(t, "the fence", func() bool { return h.a.fenced() && !h.domain(again).Running && !h.domain(never).Running })
	if !h.domain(again).Exists {
		t.Fatal("the fence undefined the domain; it must only destroy it")
	}
	// Fenced: a reconcile neither starts nor reports.
	h.mustPass(again)
	if h.domain(again).Running || h.api.count(again) != reports {
		t.Fatalf("acted while fenced: running %v, reports %d -> %d", h.domain(again).Running, reports, h.api.count(again))
	}

	stop()
	before := time.Now()
	h.a.contact()
	h.a.liftFence(before) // a stream opened before contact came back
	if !h.a.fenced() {
		t.Fatal("fence lifted by a stream older than the contact")
	}
	h.a.liftFence(time.Now())
	if h.a.fenced() {
		t.Fatal("fence not lifted by a fresh assignment set")
	}

	h.mustPass(again)
	h.wantStatus(again, minicloudv1.VMPhase_VM_PHASE_RUNNING, "Running")
	if ev := h.lastEvent(again); ev.GetReason() != lifecycle.ReasonRestarted || !strings.Contains(ev.GetMessage(), "fenced itself") {
		t.Fatalf("event %v", ev)
	}
	h.mustPass(never)
	h.wantStatus(never, minicloudv1.VMPhase_VM_PHASE_STOPPED, lifecycle.ReasonHostFenced)
	if h.domain(never).Running {
		t.Fatal("restart policy never, started anyway")
	}
}

// TestReleasedVMIsRemovedEvenWhileFenced: a VM the API released (it was
// evacuated or force-deleted while this host was fenced) is destroyed at
// once, its files go to the trash, and the release is confirmed.
func TestReleasedVMIsRemovedEvenWhileFenced(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	h.a.fence.mu.Lock()
	h.a.fence.fenced = true
	h.a.fence.mu.Unlock()
	h.a.mu.Lock()
	delete(h.a.assigned, id)
	h.a.released[id] = true
	h.a.mu.Unlock()
	h.mustPass(id)
	if h.domain(id).Exists {
		t.Fatal("released VM's domain still defined")
	}
	if _, err := os.Stat(h.a.vmDir(id)); !os.IsNotExist(err) {
		t.Fatalf("released VM's directory still there: %v", err)
	}
	if entries, _ := os.ReadDir(h.a.trashDir()); len(entries) != 1 {
		t.Fatalf("trash holds %d entries, want the VM's files", len(entries))
	}
	if r := h.api.last(id); !r.GetReleasedConfirmed() {
		t.Fatalf("last report %v, want released_confirmed", r)
	}
	if h.a.released[id] {
		t.Fatal("release not forgotten after confirmation")
	}
}

// TestOlderEpochDomainIsReplaced: the VM moved away (evacuated) and was
// placed here again: the domain of the earlier epoch is removed before the
// current one is built, and reports carry the current epoch.
func TestOlderEpochDomainIsReplaced(t *testing.T) {
	h := newHarness(t)
	id := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	h.a.mu.Lock()
	h.a.assigned[id].vm.Status.AssignmentEpoch = 1
	h.a.mu.Unlock()
	h.mustPass(id)
	if spec, _ := h.hv.Spec(id); spec.Epoch != 1 {
		t.Fatalf("domain epoch %d, want 1", spec.Epoch)
	}
	// Evacuated and placed here again: epoch 2, SCHEDULED, observed reset.
	h.a.mu.Lock()
	st := h.a.assigned[id].vm.Status
	st.AssignmentEpoch, st.Phase, st.ObservedResourceVersion, st.Conditions = 2, lifecycle.Scheduled, 0, nil
	delete(h.a.reported, id)
	h.a.mu.Unlock()
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, "Running")
	if spec, _ := h.hv.Spec(id); spec.Epoch != 2 {
		t.Fatalf("domain epoch %d after the move, want 2", spec.Epoch)
	}
	// The new copy's network step ran beside the look at the domain; the
	// old copy's removal took its port, and the step plugged it again.
	if ports := h.ports(id); len(ports) != 1 {
		t.Fatalf("ports %v after the move, want one", ports)
	}
	if entries, _ := os.ReadDir(h.a.trashDir()); len(entries) != 1 {
		t.Fatalf("the old copy's files: %d trash entries, want 1", len(entries))
	}
	if r := h.api.last(id); r.GetAssignmentEpoch() != 2 {
		t.Fatalf("report epoch %d, want 2", r.GetAssignmentEpoch())
	}
}

// TestDestroyedOutsideMinicloudStaysDown: a domain an operator destroyed
// with virsh is reported, not restarted (the policy is for failures).
func TestDestroyedOutsideMinicloudStaysDown(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	if err := hypervisortest.NewFakeDriver(h.hv).Destroy(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_STOPPED, lifecycle.ReasonStoppedUnexpectedly)
	if h.domain(id).Running {
		t.Fatal("restarted a domain destroyed on purpose")
	}
}

// TestFenceGuardWithoutTheAgent: with the agent gone (killed) and QEMU
// still running, the fence guard destroys the domain once the agent's last
// contact is older than fence-after, and marks it so; the agent, back,
// tells that stop from one made on purpose and restarts the VM.
func TestFenceGuardWithoutTheAgent(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	contact := filepath.Join(h.a.cfg.StateDir, LastContactFile)
	h.a.touchLastContact()
	old := time.Now().Add(-time.Minute)
	if err := os.Chtimes(contact, old, old); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- FenceGuard(ctx, h.a.cfg.StateDir, 300*time.Millisecond, hypervisortest.NewFakeDriver(h.hv), slog.New(slog.DiscardHandler))
	}()
	waitFor(t, "the guard to destroy the domain", func() bool { return !h.domain(id).Running })
	// Contact again: the guard leaves domains alone.
	h.a.touchLastContact()
	time.Sleep(2 * fenceCheckPeriod)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !h.a.stoppedByFence(id) {
		t.Fatal("the guard did not mark the VM stopped by a fence")
	}
	h.mustPass(id)
	h.wantStatus(id, minicloudv1.VMPhase_VM_PHASE_RUNNING, "Running")
	if ev := h.lastEvent(id); ev.GetReason() != lifecycle.ReasonRestarted {
		t.Fatalf("event %v, want Restarted", ev)
	}
	if h.a.stoppedByFence(id) {
		t.Fatal("fence mark kept after the restart")
	}
}
