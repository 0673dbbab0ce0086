package scheduler

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

const longTTL = 600

func scheduled(st *minicloudv1.VMStatus) bool {
	return st.GetPhase() == lifecycle.Scheduled
}

func events(t *testing.T, cli *clientv3.Client, id string) []*minicloudv1.Event {
	t.Helper()
	resp, err := cli.Get(context.Background(), store.VMEventsPrefix(id), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var out []*minicloudv1.Event
	for _, kv := range resp.Kvs {
		e := &minicloudv1.Event{}
		if err := proto.Unmarshal(kv.Value, e); err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

func TestSchedulesPendingVM(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-a", vcpus: 4, memMiB: 4096, diskGiB: 50}, longTTL)
	startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 1024, diskGiB: 10})

	st := waitDecided(t, cli, "vm1")
	if !scheduled(st) || st.GetHost() != "sim-a" || st.GetScheduleAttempts() != 1 {
		t.Fatalf("status %v, want SCHEDULED on sim-a after 1 attempt", st)
	}
	if len(st.GetConditions()) != 1 || st.GetConditions()[0].GetType() != lifecycle.ConditionScheduled || !st.GetConditions()[0].GetStatus() {
		t.Fatalf("conditions %v, want Scheduled=true", st.GetConditions())
	}
	ev := events(t, cli, "vm1")
	if len(ev) != 1 || ev[0].GetReason() != lifecycle.ReasonScheduled || ev[0].GetSource() != "scheduler" {
		t.Fatalf("events %v, want one Scheduled event from scheduler", ev)
	}
	checkClaimInvariants(t, cli)
}

func TestNoValidHostSaysWhichFilterRemovedWhat(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-down", vcpus: 8, memMiB: 8192, diskGiB: 50, down: true}, 0)
	registerSimulatedHost(t, cli, simHost{name: "sim-off", vcpus: 8, memMiB: 8192, diskGiB: 50, disabled: true}, longTTL)
	kvm := []string{"kvm", "tcg"}
	registerSimulatedHost(t, cli, simHost{name: "sim-az2", vcpus: 8, memMiB: 8192, diskGiB: 50, zone: "az2", hv: kvm}, longTTL)
	registerSimulatedHost(t, cli, simHost{name: "sim-small", vcpus: 8, memMiB: 1024, diskGiB: 50, zone: "az1", hv: kvm}, longTTL)
	registerSimulatedHost(t, cli, simHost{name: "sim-kvmless", vcpus: 8, memMiB: 8192, diskGiB: 50, zone: "az1"}, longTTL)
	startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 2048, diskGiB: 10, hv: "kvm", zone: "az1"})

	st := waitDecided(t, cli, "vm1")
	want := "no valid host: 5 hosts; HostUp removed 2 (disabled 1, down 1), AvailabilityZone removed 1, Hypervisor removed 1, Capacity removed 1 (memory)"
	if st.GetPhase() != lifecycle.Error || st.GetReason() != lifecycle.ReasonNoValidHost || st.GetMessage() != want {
		t.Fatalf("status %v\nwant ERROR NoValidHost %q", st, want)
	}
	ev := events(t, cli, "vm1")
	if len(ev) != 1 || ev[0].GetType() != "Warning" || ev[0].GetReason() != lifecycle.ReasonNoValidHost || ev[0].GetMessage() != want {
		t.Fatalf("events %v", ev)
	}
}

// TestRandomWorkloadNeverOvercommits runs two replicas against random
// simulated hosts (capacities, ratios, zones) and a burst of random VMs:
// every VM ends SCHEDULED or ERROR with a reason, and the claims in etcd
// never exceed any host's ratios.
func TestRandomWorkloadNeverOvercommits(t *testing.T) {
	_, cli := etcdtest.Start(t)
	rng := rand.New(rand.NewPCG(42, 7))
	for i := range 25 {
		registerSimulatedHost(t, cli, simHost{
			name: fmt.Sprintf("sim-%02d", i), vcpus: int32(1 + rng.IntN(8)), memMiB: int64(1024 * (1 + rng.IntN(16))), diskGiB: int64(20 + rng.IntN(200)),
			ratios: &minicloudv1.AllocationRatios{Cpu: []float64{0, 1, 2}[rng.IntN(3)], Ram: []float64{0, 1.5}[rng.IntN(2)]},
			zone:   []string{"az1", "az2"}[rng.IntN(2)],
		}, longTTL)
	}
	startScheduler(t, cli, Config{Source: "scheduler-1"})
	startScheduler(t, cli, Config{Source: "scheduler-2"})
	var vms []simVM
	for i := range 300 {
		vms = append(vms, simVM{
			id: fmt.Sprintf("vm-%03d", i), vcpus: int32(1 + rng.IntN(4)), memMiB: int64(256 * (1 + rng.IntN(8))), diskGiB: int64(rng.IntN(30)),
			zone: []string{"", "", "az2"}[rng.IntN(3)],
		})
	}
	createSimulatedVMs(t, cli, vms...)
	placed := 0
	for _, v := range vms {
		st := waitDecided(t, cli, v.id)
		if scheduled(st) {
			placed++
		} else if st.GetReason() != lifecycle.ReasonNoValidHost || !strings.HasPrefix(st.GetMessage(), "no valid host: 25 hosts; ") {
			t.Errorf("vm %s: ERROR without a NoValidHost reason: %v", v.id, st)
		}
	}
	t.Logf("%d of %d VMs placed", placed, len(vms))
	if placed == 0 || placed == len(vms) {
		t.Fatalf("%d of %d placed: the workload should fill the hosts and overflow", placed, len(vms))
	}
	checkClaimInvariants(t, cli)
}

// TestRaceForLastSlot: two replicas decide on the same view for the last
// slot of a host. The first commits; the second's commit fails on the
// allocation revision, it refreshes the host and goes elsewhere, or, when
// there is nowhere else, reports no valid host.
func TestRaceForLastSlot(t *testing.T) {
	for _, elsewhere := range []bool{true, false} {
		t.Run(fmt.Sprintf("elsewhere=%v", elsewhere), func(t *testing.T) {
			_, cli := etcdtest.Start(t)
			one := &minicloudv1.AllocationRatios{Cpu: 1}
			registerSimulatedHost(t, cli, simHost{name: "sim-big", vcpus: 1, memMiB: 65536, diskGiB: 100, ratios: one}, longTTL)
			if elsewhere {
				registerSimulatedHost(t, cli, simHost{name: "sim-small", vcpus: 1, memMiB: 2048, diskGiB: 100, ratios: one}, longTTL)
			}
			createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 1024}, simVM{id: "vm2", vcpus: 1, memMiB: 1024})
			var mu sync.Mutex
			var outcomes []string
			observe := func(o Observation) { mu.Lock(); outcomes = append(outcomes, o.Outcome); mu.Unlock() }
			// Both replicas load their view now and then stop following
			// etcd: both believe sim-big (most free memory) is empty.
			r1 := frozenScheduler(t, cli, Config{Source: "scheduler-1"})
			r2 := frozenScheduler(t, cli, Config{Source: "scheduler-2", Observe: observe})
			ctx := context.Background()
			rng := rand.New(rand.NewPCG(1, 1))
			if _, err := r1.scheduleOne(ctx, "vm1", rng); err != nil {
				t.Fatal(err)
			}
			if st, _ := getStatus(t, cli, "vm1"); st.GetHost() != "sim-big" {
				t.Fatalf("vm1 on %q, want sim-big", st.GetHost())
			}
			if _, err := r2.scheduleOne(ctx, "vm2", rng); err != nil {
				t.Fatal(err)
			}
			st, _ := getStatus(t, cli, "vm2")
			if outcomes[0] != "conflict" {
				t.Fatalf("replica 2 outcomes %v, want a lost race first", outcomes)
			}
			if elsewhere {
				if !scheduled(st) || st.GetHost() != "sim-small" {
					t.Fatalf("vm2: %v, want SCHEDULED on sim-small", st)
				}
			} else if st.GetReason() != lifecycle.ReasonNoValidHost || !strings.Contains(st.GetMessage(), "Capacity removed 1 (vcpus)") {
				t.Fatalf("vm2: %v, want NoValidHost for vcpus", st)
			}
			checkClaimInvariants(t, cli)
		})
	}
}

// TestLeaseExpiryRemovesHost: when a host's heartbeat lease expires its VMs
// are flagged host_down and new VMs go elsewhere; when it heartbeats again
// the flag clears.
func TestLeaseExpiryRemovesHost(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-mortal", vcpus: 8, memMiB: 8192, diskGiB: 50}, 2)
	registerSimulatedHost(t, cli, simHost{name: "sim-other", vcpus: 8, memMiB: 8192, diskGiB: 50}, longTTL)
	startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 512, target: "sim-mortal"})
	if st := waitDecided(t, cli, "vm1"); st.GetHost() != "sim-mortal" {
		t.Fatalf("vm1: %v", st)
	}
	// Nobody keeps the 2 s lease alive: etcd expires it.
	st := waitStatus(t, cli, "vm1", "host_down", func(st *minicloudv1.VMStatus) bool { return st.GetHostDown() })
	if !scheduled(st) {
		t.Fatalf("host_down changed the phase: %v", st)
	}
	createSimulatedVMs(t, cli, simVM{id: "vm2", vcpus: 1, memMiB: 512}, simVM{id: "vm3", vcpus: 1, memMiB: 512, target: "sim-mortal"})
	if st := waitDecided(t, cli, "vm2"); st.GetHost() != "sim-other" {
		t.Fatalf("vm2 placed on %q after sim-mortal's lease expired", st.GetHost())
	}
	if st := waitDecided(t, cli, "vm3"); st.GetReason() != lifecycle.ReasonNoValidHost || !strings.Contains(st.GetMessage(), "HostUp removed 1 (down)") {
		t.Fatalf("vm3 pinned to a dead host: %v", st)
	}
	heartbeat(t, cli, "sim-mortal", longTTL)
	waitStatus(t, cli, "vm1", "host_down=false", func(st *minicloudv1.VMStatus) bool { return !st.GetHostDown() })
	var reasons []string
	for _, e := range events(t, cli, "vm1") {
		reasons = append(reasons, e.GetReason())
	}
	if got := strings.Join(reasons, ","); got != "Scheduled,HostDown,HostUp" {
		t.Fatalf("vm1 events %s", got)
	}
}

// TestAntiAffinityUnderConcurrency: two replicas place the members of a
// hard anti-affinity group concurrently; no two share a host, and the
// member that does not fit reports the ServerGroup filter.
func TestAntiAffinityUnderConcurrency(t *testing.T) {
	_, cli := etcdtest.Start(t)
	const hosts = 6
	for i := range hosts {
		registerSimulatedHost(t, cli, simHost{name: fmt.Sprintf("sim-%d", i), vcpus: 16, memMiB: 16384, diskGiB: 100}, longTTL)
	}
	createServerGroup(t, cli, "default", "web", minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_ANTI_AFFINITY)
	createServerGroup(t, cli, "default", "db", minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY)
	r1 := startScheduler(t, cli, Config{Source: "scheduler-1"})
	r2 := startScheduler(t, cli, Config{Source: "scheduler-2"})
	// Both replicas know each other, so they split the work (and each
	// group has one owner); anti-affinity does not depend on it.
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for _, r := range []*Scheduler{r1, r2} {
		if err := r.members.waitMembers(ctx, 2); err != nil {
			t.Fatal(err)
		}
	}
	var vms []simVM
	for i := range hosts + 1 {
		vms = append(vms, simVM{id: fmt.Sprintf("web-%d", i), vcpus: 1, memMiB: 256, group: "web"})
		vms = append(vms, simVM{id: fmt.Sprintf("db-%d", i), vcpus: 1, memMiB: 256, group: "db"})
	}
	createSimulatedVMs(t, cli, vms...)
	webHosts := map[string]string{}
	dbHosts := map[string]bool{}
	failed := 0
	for _, v := range vms {
		st := waitDecided(t, cli, v.id)
		switch {
		case strings.HasPrefix(v.id, "db-"):
			if !scheduled(st) {
				t.Fatalf("%s: %v", v.id, st)
			}
			dbHosts[st.GetHost()] = true
		case scheduled(st):
			if other, ok := webHosts[st.GetHost()]; ok {
				t.Fatalf("anti-affinity broken: %s and %s both on %s", other, v.id, st.GetHost())
			}
			webHosts[st.GetHost()] = v.id
		default:
			failed++
			if !strings.Contains(st.GetMessage(), "ServerGroup removed 6 (anti-affinity)") {
				t.Fatalf("%s: %v", v.id, st)
			}
		}
	}
	if len(webHosts) != hosts || failed != 1 {
		t.Fatalf("web members on %d hosts, %d failed; want %d and 1", len(webHosts), failed, hosts)
	}
	// All members of a group have one owner replica, which decides them
	// one after the other: hard affinity holds with two replicas too.
	if len(dbHosts) != 1 {
		t.Fatalf("affinity group spread over %d hosts: %v", len(dbHosts), dbHosts)
	}
	checkClaimInvariants(t, cli)
}

// TestRescheduleExcludesTriedHosts: a VM sent back to PENDING (create
// failed on its host) is placed on a host it has not tried, until there is
// none or max attempts is reached.
func TestRescheduleExcludesTriedHosts(t *testing.T) {
	_, cli := etcdtest.Start(t)
	for _, h := range []string{"sim-a", "sim-b", "sim-c"} {
		registerSimulatedHost(t, cli, simHost{name: h, vcpus: 4, memMiB: 4096, diskGiB: 50}, longTTL)
	}
	startScheduler(t, cli, Config{MaxAttempts: 3})
	createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 512}, simVM{id: "vm2", vcpus: 1, memMiB: 512, target: "sim-a"})

	seen := map[string]bool{}
	for attempt := 1; attempt <= 3; attempt++ {
		st := waitStatus(t, cli, "vm1", "scheduled", scheduled)
		if seen[st.GetHost()] || st.GetScheduleAttempts() != int32(attempt) {
			t.Fatalf("attempt %d: %v (tried %v)", attempt, st, st.GetTriedHosts())
		}
		seen[st.GetHost()] = true
		simulatedReschedule(t, cli, "vm1")
	}
	st := waitDecided(t, cli, "vm1")
	if st.GetReason() != lifecycle.ReasonMaxAttemptsExceeded || len(st.GetTriedHosts()) != 3 {
		t.Fatalf("after 3 attempts: %v", st)
	}

	// vm2 is pinned to sim-a; once it failed there, nothing is left.
	waitStatus(t, cli, "vm2", "scheduled", scheduled)
	simulatedReschedule(t, cli, "vm2")
	st = waitDecided(t, cli, "vm2")
	want := "no valid host: 3 hosts; TargetHost removed 2, ExcludeTriedHosts removed 1"
	if st.GetReason() != lifecycle.ReasonNoValidHost || st.GetMessage() != want {
		t.Fatalf("vm2: %v, want %q", st, want)
	}
	checkClaimInvariants(t, cli)
}

// TestReleaseRestoresCapacity: a host full with one VM refuses the next;
// once the first VM's claim is released (as the API does when it is
// deleted) the host takes a new one.
func TestReleaseRestoresCapacity(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-a", vcpus: 2, memMiB: 2048, diskGiB: 20}, longTTL)
	startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 2048, diskGiB: 10})
	waitStatus(t, cli, "vm1", "scheduled", scheduled)
	createSimulatedVMs(t, cli, simVM{id: "vm2", vcpus: 1, memMiB: 2048, diskGiB: 10})
	if st := waitDecided(t, cli, "vm2"); st.GetReason() != lifecycle.ReasonNoValidHost {
		t.Fatalf("vm2 on a full host: %v", st)
	}
	ctx := context.Background()
	vm1, err := store.GetVM(ctx, cli, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	txn, err := store.RemoveVMTxn(ctx, cli, vm1)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := txn.Commit(ctx, cli); err != nil || !ok {
		t.Fatalf("remove vm1: %v %v", ok, err)
	}
	createSimulatedVMs(t, cli, simVM{id: "vm3", vcpus: 1, memMiB: 2048, diskGiB: 10})
	if st := waitDecided(t, cli, "vm3"); !scheduled(st) || st.GetHost() != "sim-a" {
		t.Fatalf("vm3 after release: %v", st)
	}
	checkClaimInvariants(t, cli)
}
