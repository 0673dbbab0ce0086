package scheduler

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// holdLane marks host's lane as running, so that placements on it wait
// until the test calls releaseLane: they then go out as one group.
func holdLane(s *Scheduler, host string) {
	s.lanes.mu.Lock()
	defer s.lanes.mu.Unlock()
	s.lanes.waiting[host] = []*laneRequest{}
}

// releaseLane waits until n placements wait in host's lane and runs it.
func releaseLane(t *testing.T, s *Scheduler, host string, n int) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		s.lanes.mu.Lock()
		got := len(s.lanes.waiting[host])
		s.lanes.mu.Unlock()
		if got == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d placements wait in the lane of %s, want %d", got, host, n)
		}
		time.Sleep(time.Millisecond)
	}
	go s.lanes.run(context.Background(), host)
}

// scheduleAll runs scheduleOne for every id at once and waits for them.
func scheduleAll(t *testing.T, s *Scheduler, ids ...string) {
	t.Helper()
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			if _, err := s.scheduleOne(context.Background(), id, rand.New(rand.NewPCG(uint64(i), 1))); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}

// refreshView gives s's frozen view of host what etcd holds now, as the
// watch would.
func refreshView(t *testing.T, cli *clientv3.Client, s *Scheduler, host string) {
	t.Helper()
	var reads store.Reads
	alloc, claims := reads.Get(store.HostAllocKey(host)), reads.Get(store.ClaimsPrefix(host), clientv3.WithPrefix())
	if err := reads.Do(context.Background(), cli); err != nil {
		t.Fatal(err)
	}
	s.snap.RefreshHost(host, alloc.First(), claims.KVs(), reads.Revision())
}

// TestGroupCommitPlacesOnlyWhatFits: four VMs decided for one host on a
// view from before another replica's claim there go out as one group; the
// host then has room for two of them, and exactly two are placed. The
// other two decide again and find no host. The claims never overcommit.
func TestGroupCommitPlacesOnlyWhatFits(t *testing.T) {
	_, cli := etcdtest.Start(t)
	one := &minicloudv1.AllocationRatios{Cpu: 1}
	registerSimulatedHost(t, cli, simHost{name: "sim-a", vcpus: 8, memMiB: 4096, diskGiB: 100, ratios: one}, longTTL)
	ids := []string{"vm-a", "vm-b", "vm-c", "vm-d"}
	vms := []simVM{{id: "vm-x", vcpus: 1, memMiB: 2048}}
	for _, id := range ids {
		vms = append(vms, simVM{id: id, vcpus: 1, memMiB: 1024})
	}
	createSimulatedVMs(t, cli, vms...)
	other := frozenScheduler(t, cli, Config{Source: "scheduler-1"})
	var mu sync.Mutex
	var outcomes []string
	s := frozenScheduler(t, cli, Config{Source: "scheduler-2", Observe: func(o Observation) { mu.Lock(); outcomes = append(outcomes, o.Outcome); mu.Unlock() }})
	if _, err := other.scheduleOne(context.Background(), "vm-x", rand.New(rand.NewPCG(9, 9))); err != nil {
		t.Fatal(err)
	}

	holdLane(s, "sim-a")
	done := make(chan struct{})
	go func() { defer close(done); scheduleAll(t, s, ids...) }()
	// All four were decided on the empty host; the view learns of vm-x's
	// claim before their group is committed.
	deadline := time.Now().Add(waitTimeout)
	for {
		s.lanes.mu.Lock()
		n := len(s.lanes.waiting["sim-a"])
		s.lanes.mu.Unlock()
		if n == len(ids) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d placements in the lane, want %d", n, len(ids))
		}
		time.Sleep(time.Millisecond)
	}
	refreshView(t, cli, s, "sim-a")
	releaseLane(t, s, "sim-a", len(ids))
	<-done

	var placed, failed []string
	for _, id := range ids {
		st, _ := getStatus(t, cli, id)
		switch {
		case scheduled(st) && st.GetHost() == "sim-a":
			placed = append(placed, id)
		case st.GetPhase() == lifecycle.Error && st.GetReason() == lifecycle.ReasonNoValidHost:
			failed = append(failed, id)
		default:
			t.Errorf("vm %s: %v", id, st)
		}
	}
	if len(placed) != 2 || len(failed) != 2 {
		t.Fatalf("placed %v, no valid host %v: want two of each", placed, failed)
	}
	// The two placed share one commit.
	_, ra := getStatus(t, cli, placed[0])
	_, rb := getStatus(t, cli, placed[1])
	if ra != rb {
		t.Fatalf("the placed VMs were committed at revisions %d and %d, want one group commit", ra, rb)
	}
	if n := countOutcome(&mu, outcomes, "conflict"); n != 2 {
		t.Fatalf("outcomes %v, want two placements that did not fit at commit time", outcomes)
	}
	if h, _ := s.snap.Host("sim-a"); h.Pending.MemoryMiB != 0 || h.Allocated.MemoryMiB != 4096 {
		t.Fatalf("view of sim-a after the commit: %+v", h)
	}
	checkClaimInvariants(t, cli)
}

// TestGroupConflictFallsBackToEachVM: a group whose transaction fails
// because one of its VMs changed meanwhile places nothing; each VM then
// commits on its own, and the others are placed (the changed one is
// looked at afresh later).
func TestGroupConflictFallsBackToEachVM(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-a", vcpus: 8, memMiB: 8192, diskGiB: 100}, longTTL)
	ids := []string{"vm-a", "vm-b", "vm-c"}
	var vms []simVM
	for _, id := range ids {
		vms = append(vms, simVM{id: id, vcpus: 1, memMiB: 1024})
	}
	createSimulatedVMs(t, cli, vms...)
	var mu sync.Mutex
	var outcomes []string
	s := frozenScheduler(t, cli, Config{Observe: func(o Observation) { mu.Lock(); outcomes = append(outcomes, o.Outcome); mu.Unlock() }})
	// vm-b's status is written again after the view was loaded.
	st, _ := getStatus(t, cli, "vm-b")
	b, err := proto.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(context.Background(), store.VMStatusKey("vm-b"), string(b)); err != nil {
		t.Fatal(err)
	}

	holdLane(s, "sim-a")
	done := make(chan struct{})
	go func() { defer close(done); scheduleAll(t, s, ids...) }()
	releaseLane(t, s, "sim-a", len(ids))
	<-done

	for _, id := range []string{"vm-a", "vm-c"} {
		if st, _ := getStatus(t, cli, id); !scheduled(st) || st.GetHost() != "sim-a" {
			t.Errorf("vm %s: %v, want SCHEDULED on sim-a", id, st)
		}
	}
	if resp, err := cli.Get(context.Background(), store.ClaimPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly()); err != nil || len(resp.Kvs) != 2 {
		t.Fatalf("claims %v (%v), want vm-a's and vm-c's", resp, err)
	}
	if st, _ := getStatus(t, cli, "vm-b"); st.GetPhase() != lifecycle.Pending {
		t.Errorf("vm-b: %v, want PENDING", st)
	}
	if n := countOutcome(&mu, outcomes, "conflict"); n != 2 || countOutcome(&mu, outcomes, "vm-changed") != 1 {
		t.Fatalf("outcomes %v, want vm-a and vm-c to lose with their group once, and vm-b found changed", outcomes)
	}
	if h, _ := s.snap.Host("sim-a"); h.Pending.MemoryMiB != 0 || h.Allocated.MemoryMiB != 2048 {
		t.Fatalf("view of sim-a after the fallback: %+v", h)
	}
	checkClaimInvariants(t, cli)
}

func countOutcome(mu *sync.Mutex, outcomes []string, want string) int {
	mu.Lock()
	defer mu.Unlock()
	return len(slices.DeleteFunc(slices.Clone(outcomes), func(o string) bool { return o != want }))
}
