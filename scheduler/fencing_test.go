package scheduler

import (
	"context"
	"strings"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/snapshot"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestSelfFencedHostIsEvacuated: a host whose agent self-fences loses its
// lease; the scheduler records it unreachable, counts it fenced once the
// deadline passed, and moves the VM that asked for it to another host
// with a new assignment epoch. The VM that did not ask stays.
func TestSelfFencedHostIsEvacuated(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-mortal", vcpus: 8, memMiB: 8192, diskGiB: 50, fenceAfter: 1}, 2)
	registerSimulatedHost(t, cli, simHost{name: "sim-other", vcpus: 8, memMiB: 8192, diskGiB: 50}, longTTL)
	startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli,
		simVM{id: "vm-evac", vcpus: 1, memMiB: 512, target: "sim-mortal", evacuate: true},
		simVM{id: "vm-stay", vcpus: 1, memMiB: 512, target: "sim-mortal"})
	for _, id := range []string{"vm-evac", "vm-stay"} {
		if st := waitDecided(t, cli, id); st.GetHost() != "sim-mortal" || st.GetAssignmentEpoch() != 1 {
			t.Fatalf("%s: %v", id, st)
		}
	}
	// Nobody renews the 2 s lease: after it, 1 s of self-fencing and the
	// margin, the host counts as fenced and vm-evac moves.
	st := waitStatus(t, cli, "vm-evac", "placed on sim-other", func(st *minicloudv1.VMStatus) bool { return st.GetHost() == "sim-other" })
	if !scheduled(st) || st.GetAssignmentEpoch() != 2 || len(st.GetTriedHosts()) != 1 || st.GetTriedHosts()[0] != "sim-mortal" {
		t.Fatalf("evacuated vm: %v", st)
	}
	var reasons []string
	for _, e := range events(t, cli, "vm-evac") {
		reasons = append(reasons, e.GetReason())
	}
	if got := strings.Join(reasons, ","); got != "Scheduled,HostDown,Evacuated,Scheduled" {
		t.Fatalf("vm-evac events %s", got)
	}
	fs, err := store.ReadHostFailureState(context.Background(), cli, "sim-mortal")
	if err != nil || fs.Fence.GetBy() != "timeout" || fs.DownSince == nil {
		t.Fatalf("sim-mortal failure state %+v %v", fs, err)
	}
	if ids, err := store.ListReleased(context.Background(), cli, "sim-mortal", 0); err != nil || len(ids) != 1 || ids[0] != "vm-evac" {
		t.Fatalf("release records %v %v", ids, err)
	}
	if st, _ := getStatus(t, cli, "vm-stay"); st.GetHost() != "sim-mortal" || !st.GetHostDown() || st.GetPhase() != lifecycle.Scheduled {
		t.Fatalf("vm-stay (on_host_failure STOP) moved: %v", st)
	}
	checkClaimInvariants(t, cli)
}

// TestHostWithoutSelfFencingIsNotFencedByTime: an agent that never
// self-fences (fence_after 0) may still run its VMs; only an operator can
// fence its host.
func TestHostWithoutSelfFencingIsNotFencedByTime(t *testing.T) {
	_, cli := etcdtest.Start(t)
	registerSimulatedHost(t, cli, simHost{name: "sim-mortal", vcpus: 8, memMiB: 8192, diskGiB: 50}, 1)
	registerSimulatedHost(t, cli, simHost{name: "sim-other", vcpus: 8, memMiB: 8192, diskGiB: 50}, longTTL)
	s := startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli, simVM{id: "vm1", vcpus: 1, memMiB: 512, target: "sim-mortal", evacuate: true})
	waitDecided(t, cli, "vm1")
	waitStatus(t, cli, "vm1", "host_down", func(st *minicloudv1.VMStatus) bool { return st.GetHostDown() })
	waitDownSince(t, cli, "sim-mortal")
	// A pass a day later than any deadline the scheduler could compute
	// with a zero delay, instead of a sleep: the clock is the argument.
	var down *snapshot.DownHost
	for _, h := range s.Snapshot().Down() {
		if h.Name == "sim-mortal" {
			down = &h
		}
	}
	if down == nil || down.FenceAfter != 0 {
		t.Fatalf("the view's down hosts %+v: want sim-mortal without a fence delay", s.Snapshot().Down())
	}
	if err := s.handleDownHost(context.Background(), *down, time.Now().Add(24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	fs, err := store.ReadHostFailureState(context.Background(), cli, "sim-mortal")
	if err != nil || fs.Fence != nil || fs.DownSince == nil {
		t.Fatalf("sim-mortal failure state %+v %v", fs, err)
	}
	if st, _ := getStatus(t, cli, "vm1"); st.GetHost() != "sim-mortal" {
		t.Fatalf("vm1 left a host that was never fenced: %v", st)
	}
}

// waitDownSince waits until the scheduler recorded host as unreachable.
func waitDownSince(t *testing.T, cli *clientv3.Client, host string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		fs, err := store.ReadHostFailureState(context.Background(), cli, host)
		if err == nil && fs.DownSince != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never recorded unreachable: %+v %v", host, fs, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
