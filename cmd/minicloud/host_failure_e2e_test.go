package main

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestE2EHostFailureCommands runs `minicloudd api` and `minicloudd
// scheduler` with SIMULATED hosts (they register and heartbeat through the
// API, boot nothing) and walks the operator's path of docs/operations.md
// ("When a host dies") with the CLI: a host's lease ends, host list and
// show say UNREACHABLE and since when, evacuation and forced deletes are
// refused until `host fence --confirm`, the VM that asked for it is
// rebuilt elsewhere by the scheduler at once, `host evacuate --vm` moves
// the other, `vm delete --force` removes a third, and `host delete`
// removes the emptied host.
func TestE2EHostFailureCommands(t *testing.T) {
	t.Parallel() // an API of its own (own etcd, ports, dirs), nothing on the host
	c := startAPI(t)
	c.seed()
	cloudtest.StartScheduler(t, "scheduler", c.EtcdURL)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// register joins a simulated host that heartbeats every 3 s until the
	// returned stop is called (a single heartbeat would let the 15 s lease
	// lapse while a loaded machine is still placing the VMs).
	register := func(name string) (stop func()) {
		t.Helper()
		hctx, hcancel := context.WithCancel(ctx)
		hc, err := client.Dial(ctx, c.Endpoint, c.HostDialOptions(name)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { hc.Close() })
		if _, err := hc.Hosts.RegisterHost(ctx, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
			Meta: &minicloudv1.ObjectMeta{Name: name}, Address: "127.0.0.1:1", Hypervisors: []string{"tcg"},
			Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 8192, DiskGib: 100},
		}}); err != nil {
			t.Fatal(err)
		}
		if _, err := hc.Hosts.Heartbeat(ctx, &minicloudv1.HeartbeatRequest{Name: name}); err != nil {
			t.Fatal(err)
		}
		stopped := make(chan struct{})
		go func() {
			defer close(stopped)
			for {
				select {
				case <-hctx.Done():
					return
				case <-time.After(3 * time.Second):
					hc.Hosts.Heartbeat(hctx, &minicloudv1.HeartbeatRequest{Name: name})
				}
			}
		}()
		return func() { hcancel(); <-stopped }
	}
	// waitFor polls what until it holds, for at most a minute (a loaded
	// machine is slow; this bounds a hang, it does not measure speed).
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); !ok(); time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("not within a minute: %s", what)
			}
		}
	}
	vmOn := func(name, host string, epoch int64) func() bool {
		return func() bool {
			vm, err := c.Client.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: name, Project: "default"})
			return err == nil && vm.GetStatus().GetHost() == host && vm.GetStatus().GetAssignmentEpoch() == epoch
		}
	}
	flat := func(s string) string { return strings.Join(strings.Fields(s), " ") }

	stopH1 := register("h1")
	c.ok("vm", "create", "auto", "--image", "tiny", "--flavor", "tiny", "--on-host-failure", "evacuate", "--restart-policy", "never")
	c.ok("vm", "create", "manual", "--image", "tiny", "--flavor", "tiny")
	c.ok("vm", "create", "gone", "--image", "tiny", "--flavor", "tiny")
	for _, name := range []string{"auto", "manual", "gone"} {
		waitFor("vm "+name+" placed on h1", vmOn(name, "h1", 1))
	}
	if show := flat(c.ok("vm", "show", "auto")); !strings.Contains(show, "On host failure: evacuate Restart policy: never Assignment epoch: 1") {
		t.Fatalf("vm show auto:\n%s", show)
	}
	if show := flat(c.ok("vm", "show", "manual")); !strings.Contains(show, "On host failure: stop Restart policy: on-failure") {
		t.Fatalf("vm show manual:\n%s", show)
	}
	c.fails(exitConflict, "is UP", "host", "fence", "h1", "--confirm")

	// h1 stops renewing its lease (as 15 s without a heartbeat do).
	stopH1()
	resp, err := c.Etcd.Get(ctx, store.HostAliveKey("h1"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("h1's lease: %v %v", resp, err)
	}
	if _, err := c.Etcd.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	waitFor("host show h1 says since when it is unreachable", func() bool {
		return strings.Contains(c.ok("host", "show", "h1"), "Unreachable since:")
	})
	show := flat(c.ok("host", "show", "h1"))
	if !strings.Contains(show, "State: unreachable") || !strings.Contains(show, "Self-fencing: off (only an operator can fence this host") {
		t.Fatalf("host show h1 (unreachable):\n%s", show)
	}
	if list := c.ok("host", "list"); !strings.Contains(flat(list), "h1 unreachable") || !strings.Contains(list, "UNREACHABLE") {
		t.Fatalf("host list:\n%s", list)
	}
	c.fails(exitConflict, "UNREACHABLE but not FENCED", "host", "evacuate", "h1")
	c.fails(exitConflict, "host fence h1 --confirm", "vm", "delete", "gone", "--force")
	c.fails(exitUsage, "--confirm", "host", "fence", "h1")

	if out := c.ok("host", "fence", "h1", "--confirm", "--reason", "powered off at the PDU"); !strings.Contains(out, "host h1 fenced by operator:") {
		t.Fatalf("host fence printed %q", out)
	}
	show = flat(c.ok("host", "show", "h1"))
	for _, want := range []string{"State: fenced", "Fence reason: powered off at the PDU", " by operator:"} {
		if !strings.Contains(show, want) {
			t.Fatalf("host show h1 (fenced) lacks %q:\n%s", want, show)
		}
	}

	// The scheduler rebuilds the VM that asked for it on the new host at
	// once (a new epoch); the others wait for the operator.
	register("h2")
	waitFor("vm auto evacuated to h2", vmOn("auto", "h2", 2))
	if !vmOn("manual", "h1", 1)() {
		t.Fatal("vm manual (on-host-failure stop) left h1 without an operator")
	}
	c.fails(exitNotFound, "no VM nope on host h1", "host", "evacuate", "h1", "--vm", "nope")
	out := c.ok("host", "evacuate", "h1", "--vm", "manual")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 1 || !strings.HasPrefix(lines[0], "vm manual (") ||
		!strings.Contains(lines[0], "rebuilt from image tiny on another host with the same id, name, addresses and user-data; its local disk on h1 is lost") {
		t.Fatalf("host evacuate printed:\n%s", out)
	}
	waitFor("vm manual rebuilt on h2", vmOn("manual", "h2", 2))
	if events := c.ok("vm", "events", "manual"); !strings.Contains(events, "local disk on h1 is lost") {
		t.Fatalf("vm events manual:\n%s", events)
	}

	c.fails(exitConflict, "still holds 1 VMs", "host", "delete", "h1")
	if out := c.ok("vm", "delete", "gone", "--force"); !strings.Contains(out, "vm gone deleted without its host h1") {
		t.Fatalf("vm delete --force printed %q", out)
	}
	c.fails(exitNotFound, "gone", "vm", "show", "gone")
	if out := c.ok("host", "evacuate", "h1"); out != "host h1: no VM to evacuate\n" {
		t.Fatalf("host evacuate of an empty host printed %q", out)
	}
	if out := c.ok("host", "delete", "h1"); out != "host h1 deleted\n" {
		t.Fatalf("host delete printed %q", out)
	}
	if list := c.ok("host", "list"); strings.Contains(list, "h1") || !strings.Contains(flat(list), "h2 up") {
		t.Fatalf("host list after host delete:\n%s", list)
	}
}
