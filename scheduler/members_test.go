package scheduler

import (
	"context"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

func TestRendezvousOwnershipIsExclusive(t *testing.T) {
	a, b := newMembers(nil, "replica-a"), newMembers(nil, "replica-b")
	for _, m := range []*members{a, b} {
		m.ids = map[string]bool{"replica-a": true, "replica-b": true}
		m.publish(true)
	}
	checkSplit(t, "VMs", a.owns, b.owns)
	checkSplit(t, "hosts", a.prefersHost, b.prefersHost)
	alone := newMembers(nil, "replica-c")
	if !alone.owns("vm-1") || !alone.prefersHost("sim-1") {
		t.Fatal("a replica that has not joined yet must own everything")
	}
}

// checkSplit checks that exactly one of two replicas owns each of 1000
// keys, and each about half.
func checkSplit(t *testing.T, what string, a, b func(string) bool) {
	t.Helper()
	ofA := 0
	for i := range 1000 {
		key := fmt.Sprintf("key-%d", i)
		if a(key) == b(key) {
			t.Fatalf("%s %s: owned by both or neither", what, key)
		}
		if a(key) {
			ofA++
		}
	}
	if ofA < 400 || ofA > 600 {
		t.Fatalf("replica-a owns %d of 1000 %s: the split is unbalanced", ofA, what)
	}
}

// TestDeadReplicaShareIsTakenOver: a replica that announced itself and then
// stopped working (simulated: its membership key exists, nothing runs
// behind it) owns about half of the VMs; the live replica places them
// after takeoverDelay.
func TestDeadReplicaShareIsTakenOver(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	l, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, store.SchedulerKey("dead-replica"), "dead-replica", clientv3.WithLease(l.ID)); err != nil {
		t.Fatal(err)
	}
	registerSimulatedHost(t, cli, simHost{name: "sim-a", vcpus: 32, memMiB: 65536, diskGiB: 500}, longTTL)
	s := startScheduler(t, cli, Config{})
	select {
	case <-s.members.joined:
	case <-time.After(waitTimeout):
		t.Fatal("replica never joined")
	}
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()
	if err := s.members.waitMembers(wctx, 2); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var vms []simVM
	deadOwns := 0
	for i := range 20 {
		vms = append(vms, simVM{id: fmt.Sprintf("vm-%d", i), vcpus: 1, memMiB: 256})
	}
	createSimulatedVMs(t, cli, vms...)
	for _, v := range vms {
		if !s.members.owns("vm/" + v.id) {
			deadOwns++
		}
		if st := waitDecided(t, cli, v.id); !scheduled(st) {
			t.Fatalf("%s: %v", v.id, st)
		}
	}
	if deadOwns == 0 {
		t.Fatal("the dead replica owned no VM: the test proved nothing")
	}
	t.Logf("%d of %d VMs were the dead replica's share; all placed after %s", deadOwns, len(vms), time.Since(start))
}
