package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// TestLabPartitionedHostIsFencedAndEvacuated (issue 13): a host cut off
// from the control plane destroys its domains after --fence-after; the
// control plane counts it FENCED once the lease, fence-after and the
// margin have passed, and rebuilds the VM that asked for it
// (--on-host-failure evacuate) on another host with the same id and
// address. When the partition heals, the host removes its old copy: the
// VM is defined in exactly one libvirt.
func TestLabPartitionedHostIsFencedAndEvacuated(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hosts := l.HostNames()
	h := hosts[len(hosts)/2]
	vm, err := c.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{Name: "evac-1", Spec: &minicloudv1.VMSpec{
		Image: "tiny", Flavor: "tiny", TargetHost: h,
		OnHostFailure: minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE,
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		_, _ = c.VMs.DeleteVM(context.Background(), &minicloudv1.DeleteVMRequest{Name: "evac-1"})
	}()
	if vm, err = l.WaitVM(ctx, "evac-1", minicloudv1.VMPhase_VM_PHASE_RUNNING, 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	domain := "mc-" + vm.GetMeta().GetId()
	ip := vm.GetStatus().GetAddresses()[0].GetIp()

	if err := l.Partition(h); err != nil {
		t.Fatal(err)
	}
	healed := false
	defer func() {
		if !healed {
			_ = l.Heal(h)
		}
	}()
	cut := time.Now()
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_FENCED)
	t.Logf("%s fenced %s after the partition", h, time.Since(cut).Round(time.Second))
	// The agent destroyed its domain by itself, before the control plane
	// counted the host fenced.
	if state, err := l.Output(ctx, h, "virsh", "domstate", domain); err != nil || strings.TrimSpace(state) == "running" {
		t.Fatalf("on fenced %s, domain %s is %q (%v)", h, domain, strings.TrimSpace(state), err)
	}

	var moved *minicloudv1.VM
	deadline := time.Now().Add(5 * time.Minute)
	for {
		moved, err = c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: "evac-1"})
		if err != nil {
			t.Fatal(err)
		}
		if st := moved.GetStatus(); st.GetHost() != "" && st.GetHost() != h && st.GetPhase() == minicloudv1.VMPhase_VM_PHASE_RUNNING {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("evac-1 not running elsewhere 5m after %s was fenced: %v", h, moved.GetStatus())
		}
		time.Sleep(time.Second)
	}
	t.Logf("evac-1 running on %s %s after the partition", moved.GetStatus().GetHost(), time.Since(cut).Round(time.Second))
	if moved.GetMeta().GetId() != vm.GetMeta().GetId() || moved.GetStatus().GetAddresses()[0].GetIp() != ip ||
		moved.GetStatus().GetAssignmentEpoch() <= vm.GetStatus().GetAssignmentEpoch() {
		t.Fatalf("evacuated VM changed identity or address, or kept its epoch: before %v, after %v", vm.GetStatus(), moved.GetStatus())
	}

	if err := l.Heal(h); err != nil {
		t.Fatal(err)
	}
	healed = true
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_UP)
	// The returning host removes its copy (released before its BOOKMARK).
	deadline = time.Now().Add(3 * time.Minute)
	for {
		out, err := l.Output(ctx, h, "virsh", "list", "--all", "--name")
		if err == nil && !strings.Contains(out, domain) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still defines %s 3m after it came back:\n%s", h, domain, out)
		}
		time.Sleep(time.Second)
	}
	// Exactly one host runs it.
	for _, other := range hosts {
		out, err := l.Output(ctx, other, "virsh", "list", "--name")
		if err != nil {
			t.Fatalf("virsh list on %s: %v", other, err)
		}
		if running := strings.Contains(out, domain); running != (other == moved.GetStatus().GetHost()) {
			t.Errorf("%s running %s: %v (the VM is on %s)", other, domain, running, moved.GetStatus().GetHost())
		}
	}
	if _, err := c.VMs.DeleteVM(ctx, &minicloudv1.DeleteVMRequest{Name: "evac-1"}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(3 * time.Minute)
	for {
		_, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: "evac-1"})
		if errdefs.IsNotFound(errdefs.FromGRPC(err)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("evac-1 not deleted 3m after DeleteVM: %v", err)
		}
		time.Sleep(time.Second)
	}
	auditLab(t, l, vm.GetMeta().GetId())
}

// TestLabKilledAgentIsFencedByTheGuard (issue 13, "kill -9 an agent"): a
// host's agent killed with SIGKILL while its QEMU runs cannot fence the
// host; its fence guard does, after --fence-after, so the host runs
// nothing by the time the control plane counts it fenced. The agent,
// restarted, starts the VM again (restart policy on-failure, HostFenced).
func TestLabKilledAgentIsFencedByTheGuard(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := l.HostNames()[0]
	name := lab.VMName(h)
	vm, err := l.WaitVM(ctx, name, minicloudv1.VMPhase_VM_PHASE_RUNNING, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	domain := "mc-" + vm.GetMeta().GetId()
	if err := l.Kill(h + "-agent"); err != nil {
		t.Fatal(err)
	}
	restarted := false
	defer func() {
		if !restarted {
			_ = l.Restart(context.Background(), h+"-agent")
		}
	}()
	killed := time.Now()
	deadline := killed.Add(2 * time.Minute)
	for {
		state, err := l.Output(ctx, h, "virsh", "domstate", domain)
		if err == nil && strings.TrimSpace(state) != "running" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still %q 2m after %s's agent was killed: the fence guard did not act", domain, strings.TrimSpace(state), h)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("fence guard destroyed %s %s after the agent was killed", domain, time.Since(killed).Round(time.Second))
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_FENCED)

	if err := l.Restart(ctx, h+"-agent"); err != nil {
		t.Fatal(err)
	}
	restarted = true
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_UP)
	deadline = time.Now().Add(5 * time.Minute)
	for {
		state, _ := l.Output(ctx, h, "virsh", "domstate", domain)
		if strings.TrimSpace(state) == "running" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is %q 5m after the agent came back: not restarted", domain, strings.TrimSpace(state))
		}
		time.Sleep(time.Second)
	}
	evs, err := c.VMs.ListVMEvents(ctx, &minicloudv1.ListVMEventsRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range evs.GetEvents() {
		found = found || (e.GetReason() == "Restarted" && strings.Contains(e.GetMessage(), "fenced"))
	}
	if !found {
		t.Errorf("no Restarted event naming the fence for %s: %v", name, evs.GetEvents())
	}
	if _, err := l.WaitVM(ctx, name, minicloudv1.VMPhase_VM_PHASE_RUNNING, 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	auditLab(t, l)
}
