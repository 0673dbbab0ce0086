package scheduler

// Helpers that stand in for the rest of minicloud in these tests, against a
// real embedded etcd: simulated hosts (registration and heartbeat lease
// written directly, as the API does for a real agent; no libvirt) and a
// simulated API (VMs written as PENDING exactly as CreateVM writes them).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

const waitTimeout = 30 * time.Second

type simHost struct {
	name    string
	vcpus   int32
	memMiB  int64
	diskGiB int64
	ratios  *minicloudv1.AllocationRatios
	zone    string
	hv      []string
	// down registers the host without a heartbeat lease.
	down     bool
	disabled bool
	// fenceAfter is the agent's self-fencing delay in seconds.
	fenceAfter int64
}

// registerSimulatedHost writes a simulated host's registration and, unless
// down, its alive key on a fresh lease of ttl seconds that nobody keeps
// alive (use a long ttl for hosts that must stay up). It returns the lease.
func registerSimulatedHost(t testing.TB, cli *clientv3.Client, h simHost, ttl int64) clientv3.LeaseID {
	t.Helper()
	ctx := context.Background()
	if h.hv == nil {
		h.hv = []string{"tcg"}
	}
	b, err := proto.Marshal(&minicloudv1.Host{
		Meta:              &minicloudv1.ObjectMeta{Name: h.name},
		Address:           "simulated",
		Capacity:          &minicloudv1.Resources{Vcpus: h.vcpus, MemoryMib: h.memMiB, DiskGib: h.diskGiB},
		AllocationRatios:  h.ratios,
		Hypervisors:       h.hv,
		AvailabilityZone:  h.zone,
		Disabled:          h.disabled,
		FenceAfterSeconds: h.fenceAfter,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, store.HostSpecKey(h.name), string(b)); err != nil {
		t.Fatal(err)
	}
	if h.down {
		return 0
	}
	return heartbeat(t, cli, h.name, ttl)
}

// heartbeat puts the host's alive key on a new lease, as the API does when
// a host registers or comes back.
func heartbeat(t testing.TB, cli *clientv3.Client, host string, ttl int64) clientv3.LeaseID {
	t.Helper()
	ctx := context.Background()
	l, err := cli.Grant(ctx, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, store.HostAliveKey(host), fmt.Sprint(l.ID), clientv3.WithLease(l.ID)); err != nil {
		t.Fatal(err)
	}
	return l.ID
}

type simVM struct {
	id       string
	project  string
	vcpus    int32
	memMiB   int64
	diskGiB  int64
	zone     string
	group    string
	target   string
	hv       string
	tried    []string
	attempts int32
	evacuate bool
}

func onHostFailure(evacuate bool) minicloudv1.HostFailurePolicy {
	if evacuate {
		return minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE
	}
	return minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_UNSPECIFIED
}

// simulatedCreateOps are the writes of the simulated API's CreateVM.
func simulatedCreateOps(t testing.TB, v simVM) []clientv3.Op {
	if v.project == "" {
		v.project = "default"
	}
	spec, err := proto.Marshal(&minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: v.id, Name: v.id, Project: v.project},
		Spec: &minicloudv1.VMSpec{
			Image: "simulated", Flavor: "simulated",
			Resources:          &minicloudv1.Resources{Vcpus: v.vcpus, MemoryMib: v.memMiB, DiskGib: v.diskGiB},
			AvailabilityZone:   v.zone,
			ServerGroup:        v.group,
			TargetHost:         v.target,
			RequiredHypervisor: v.hv,
			OnHostFailure:      onHostFailure(v.evacuate),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := proto.Marshal(&minicloudv1.VMStatus{
		Phase: minicloudv1.VMPhase_VM_PHASE_PENDING, TriedHosts: v.tried, ScheduleAttempts: v.attempts,
	})
	if err != nil {
		t.Fatal(err)
	}
	return []clientv3.Op{clientv3.OpPut(store.VMSpecKey(v.id), string(spec)), clientv3.OpPut(store.VMStatusKey(v.id), string(st))}
}

func createSimulatedVMs(t *testing.T, cli *clientv3.Client, vms ...simVM) {
	t.Helper()
	var ops []clientv3.Op
	for _, v := range vms {
		ops = append(ops, simulatedCreateOps(t, v)...)
	}
	for len(ops) > 0 {
		n := min(len(ops), 100)
		if _, err := cli.Txn(context.Background()).Then(ops[:n]...).Commit(); err != nil {
			t.Fatal(err)
		}
		ops = ops[n:]
	}
}

func createServerGroup(t *testing.T, cli *clientv3.Client, project, name string, p minicloudv1.ServerGroupPolicy) {
	t.Helper()
	b, _ := proto.Marshal(&minicloudv1.ServerGroup{Meta: &minicloudv1.ObjectMeta{Name: name, Project: project}, Policy: p})
	if _, err := cli.Put(context.Background(), store.ServerGroupKey(project, name), string(b)); err != nil {
		t.Fatal(err)
	}
}

// simulatedReschedule is what the API does when a host reports that a
// create failed: release the claim and put the VM back to PENDING with the
// host appended to tried_hosts.
func simulatedReschedule(t *testing.T, cli *clientv3.Client, id string) {
	t.Helper()
	ctx := context.Background()
	// Retry on conflict like the API: the scheduler may be changing the
	// same host's allocation at the same time.
	for range 100 {
		st, rev := getStatus(t, cli, id)
		cs, err := store.ReadClaimState(ctx, cli, st.GetHost(), id)
		if err != nil {
			t.Fatal(err)
		}
		cmps, ops, err := store.ReleaseClaimOps(cs)
		if err != nil {
			t.Fatal(err)
		}
		st.TriedHosts = append(st.TriedHosts, st.GetHost())
		st.Host = ""
		st.Phase = minicloudv1.VMPhase_VM_PHASE_PENDING
		b, _ := proto.Marshal(st)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(store.VMStatusKey(id)), "=", rev))
		resp, err := cli.Txn(ctx).If(cmps...).Then(append(ops, clientv3.OpPut(store.VMStatusKey(id), string(b)))...).Commit()
		if err != nil {
			t.Fatal(err)
		}
		if resp.Succeeded {
			return
		}
	}
	t.Fatalf("simulated reschedule of %s kept conflicting", id)
}

func getStatus(t *testing.T, cli *clientv3.Client, id string) (*minicloudv1.VMStatus, int64) {
	t.Helper()
	resp, err := cli.Get(context.Background(), store.VMStatusKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		t.Fatalf("vm %s has no status", id)
	}
	st := &minicloudv1.VMStatus{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, st); err != nil {
		t.Fatal(err)
	}
	return st, resp.Kvs[0].ModRevision
}

// waitStatus watches vm id's status until cond holds (or fails the test
// after waitTimeout) and returns it.
func waitStatus(t *testing.T, cli *clientv3.Client, id string, what string, cond func(*minicloudv1.VMStatus) bool) *minicloudv1.VMStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	st, rev := getStatus(t, cli, id)
	if cond(st) {
		return st
	}
	for wr := range cli.Watch(ctx, store.VMStatusKey(id), clientv3.WithRev(rev+1)) {
		for _, ev := range wr.Events {
			st = &minicloudv1.VMStatus{}
			if err := proto.Unmarshal(ev.Kv.Value, st); err != nil {
				t.Fatal(err)
			}
			if cond(st) {
				return st
			}
		}
	}
	t.Fatalf("vm %s: not %s within %s; last status %v", id, what, waitTimeout, st)
	return nil
}

func decided(st *minicloudv1.VMStatus) bool {
	return st.GetPhase() == minicloudv1.VMPhase_VM_PHASE_SCHEDULED || st.GetPhase() == minicloudv1.VMPhase_VM_PHASE_ERROR
}

func waitDecided(t *testing.T, cli *clientv3.Client, id string) *minicloudv1.VMStatus {
	t.Helper()
	return waitStatus(t, cli, id, "SCHEDULED or ERROR", decided)
}

// newQuietScheduler returns a replica that logs nowhere unless cfg says.
func newQuietScheduler(t testing.TB, cli *clientv3.Client, cfg Config) *Scheduler {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s, err := New(cli, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// startScheduler runs a replica until the test ends.
func startScheduler(t testing.TB, cli *clientv3.Client, cfg Config) *Scheduler {
	t.Helper()
	s := newQuietScheduler(t, cli, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("scheduler Run: %v", err)
		}
	})
	select {
	case <-s.Snapshot().Synced():
	case <-time.After(waitTimeout):
		t.Fatal("scheduler snapshot never synced")
	}
	return s
}

// frozenScheduler returns a replica whose view (snapshot and VM statuses)
// was loaded once and then stops following etcd: a deterministic stale
// view. Its workers do not run; tests drive scheduleOne directly.
func frozenScheduler(t *testing.T, cli *clientv3.Client, cfg Config) *Scheduler {
	t.Helper()
	s := newQuietScheduler(t, cli, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = s.snap.Run(ctx) })
	<-s.snap.Synced()
	cancel()
	wg.Wait()
	resp, err := cli.Get(context.Background(), store.VMStatusPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		s.statusChanged(mvccpb.PUT, kv)
	}
	// The committer runs: only the view is frozen.
	cctx, ccancel := context.WithCancel(context.Background())
	var cwg sync.WaitGroup
	cwg.Go(func() { s.batch.run(cctx) })
	t.Cleanup(func() { ccancel(); cwg.Wait() })
	return s
}

// checkClaimInvariants fails the test on any violation VerifyClaims finds.
func checkClaimInvariants(t testing.TB, cli *clientv3.Client) {
	t.Helper()
	violations, err := VerifyClaims(context.Background(), cli)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range violations {
		t.Error(v)
	}
}
