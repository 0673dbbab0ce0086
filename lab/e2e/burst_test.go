package e2e

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// TestLabCreateBurstSurvivesLosingMembers (issue 10, section 4): during a
// burst of 30 creates, one etcd member, one API replica and one scheduler
// replica are killed with SIGKILL, each at a different moment. Every
// create ends RUNNING, no VM is defined in two hosts' libvirts (or twice
// anywhere), and no address or MAC is handed out twice. The killed
// processes are restarted and the VMs deleted at the end, and the
// invariant auditor finds nothing (lab/invariants).
func TestLabCreateBurstSurvivesLosingMembers(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// 30 VMs and the lab's own are more than a project's default quota
	// (20 VMs, 40 vCPUs).
	unlimited := int64(-1)
	if _, err := c.Quotas.SetQuota(ctx, &minicloudv1.SetQuotaRequest{Limits: &minicloudv1.QuotaLimits{Instances: &unlimited, Vcpus: &unlimited}}); err != nil {
		t.Fatal(err)
	}

	const burst = 30
	// A create starts every pace, each in its own goroutine (so up to all
	// 30 are in flight at once); the kills happen just before creates 6,
	// 14 and 22 start, seconds apart, while earlier ones are still being
	// accepted, scheduled and started.
	const pace = 500 * time.Millisecond
	kills := map[int]string{6: "etcd1", 14: "api1", 22: "scheduler1"}
	names := make([]string, burst)
	for i := range names {
		names[i] = fmt.Sprintf("burst-%02d", i)
	}
	// Deferred in this order so the lab is whole again before the deletes,
	// and the auditor runs last: the deleted VMs must be gone everywhere.
	ids := map[string]string{} // VM id -> name
	defer func() {
		deleted := make([]string, 0, len(ids))
		for id := range ids {
			deleted = append(deleted, id)
		}
		auditLab(t, l, deleted...)
	}()
	defer func() { deleteVMs(t, l, c, names) }()
	var killed []string
	defer func() {
		for _, name := range killed {
			if err := l.Restart(ctx, name); err != nil {
				t.Errorf("restart %s: %v", name, err)
			}
		}
	}()

	// Each create is retried under its request id until it is accepted: a
	// caller's view of a cluster losing members.
	errs := make(chan error, burst+len(kills))
	var wg sync.WaitGroup
	begin := time.Now()
	for i, name := range names {
		if p, ok := kills[i]; ok {
			if err := l.Kill(p); err != nil {
				errs <- fmt.Errorf("kill %s: %w", p, err)
			} else {
				killed = append(killed, p)
				t.Logf("killed %s before create %d (%s into the burst)", p, i, time.Since(begin).Round(time.Millisecond))
			}
		}
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			deadline := time.Now().Add(3 * time.Minute)
			for {
				cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				_, err := c.VMs.CreateVM(cctx, &minicloudv1.CreateVMRequest{Name: name, RequestId: "burst-" + name,
					Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}})
				cancel()
				if err == nil || errdefs.IsAlreadyExists(err) {
					return
				}
				if time.Now().After(deadline) {
					errs <- fmt.Errorf("create %s: %w", name, err)
					return
				}
				time.Sleep(time.Second)
			}
		}(name)
		time.Sleep(pace)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(killed) != len(kills) {
		t.Errorf("killed %v, want one of each of %v", killed, kills)
	}

	for _, n := range names {
		vm, err := l.WaitVM(ctx, n, minicloudv1.VMPhase_VM_PHASE_RUNNING, 10*time.Minute)
		if err != nil {
			t.Error(err)
			continue
		}
		ids[vm.GetMeta().GetId()] = n
		vmIDs = append(vmIDs, vm.GetMeta().GetId()) // for TestMain's leak check
	}
	t.Logf("30 creates RUNNING %s after the burst began", time.Since(begin).Round(time.Second))

	// The API's view: each name once, each address and MAC once.
	list, err := c.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{AllProjects: true})
	if err != nil {
		t.Fatal(err)
	}
	seenName, seenIP, seenMAC := map[string]int{}, map[string]string{}, map[string]string{}
	known := map[string]bool{}
	for _, vm := range list.Vms {
		name := vm.GetMeta().GetName()
		known[vm.GetMeta().GetId()] = true
		seenName[name]++
		for _, a := range vm.GetStatus().GetAddresses() {
			ipKey := a.GetNetwork() + " " + a.GetIp()
			if other, ok := seenIP[ipKey]; ok && a.GetIp() != "" {
				t.Errorf("address %s given to %s and %s", ipKey, other, name)
			}
			seenIP[ipKey] = name
			if other, ok := seenMAC[a.GetMac()]; ok && a.GetMac() != "" {
				t.Errorf("MAC %s given to %s and %s", a.GetMac(), other, name)
			}
			seenMAC[a.GetMac()] = name
		}
	}
	for _, n := range names {
		if seenName[n] != 1 {
			t.Errorf("%s listed %d times", n, seenName[n])
		}
	}

	// Every host's own libvirt: each burst VM defined on exactly one host,
	// the one the API says, and no domain the API does not know.
	definedOn := map[string][]string{}
	for _, h := range l.HostNames() {
		out, err := l.Output(ctx, h, "virsh", "list", "--all", "--name")
		if err != nil {
			t.Fatalf("virsh list on %s: %v", h, err)
		}
		for _, d := range strings.Fields(out) {
			id := strings.TrimPrefix(d, "mc-")
			definedOn[id] = append(definedOn[id], h)
			if !known[id] {
				t.Errorf("domain %s on %s belongs to no VM the API knows", d, h)
			}
		}
	}
	for id, n := range ids {
		vm, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: n})
		if err != nil {
			t.Fatal(err)
		}
		if on := definedOn[id]; len(on) != 1 || on[0] != vm.GetStatus().GetHost() {
			t.Errorf("%s (RUNNING on %s) is defined in the libvirt of %v", n, vm.GetStatus().GetHost(), on)
		}
	}
}
