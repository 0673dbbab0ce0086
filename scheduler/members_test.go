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
	ownedByA := 0
	for i := range 1000 {
		id := fmt.Sprintf("vm-%d", i)
		if a.owns(id) == b.owns(id) {
			t.Fatalf("%s: owned by both or neither", id)
		}
		if a.owns(id) {
			ownedByA++
		}
	}
	if ownedByA < 400 || ownedByA > 600 {
		t.Fatalf("replica-a owns %d of 1000 VMs: the split is unbalanced", ownedByA)
	}
	alone := newMembers(nil, "replica-c")
	if !alone.owns("vm-1") || !alone.prefersHost("sim-1") {
		t.Fatal("a replica that has not joined yet must own everything")
	}
	hostsOfA := 0
	for i := range 1000 {
		h := fmt.Sprintf("sim-%d", i)
		if a.prefersHost(h) == b.prefersHost(h) {
			t.Fatalf("%s: preferred by both or neither", h)
		}
		if a.prefersHost(h) {
			hostsOfA++
		}
	}
	if hostsOfA < 400 || hostsOfA > 600 {
		t.Fatalf("replica-a prefers %d of 1000 hosts: the split is unbalanced", hostsOfA)
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
	if n := len(s.members.view.Load().ids); n != 2 {
		t.Fatalf("replica sees %d members, want itself and the dead one", n)
	}
	start := time.Now()
	var vms []simVM
	deadOwns := 0
	for i := range 20 {
		vms = append(vms, simVM{id: fmt.Sprintf("vm-%d", i), vcpus: 1, memMiB: 256})
	}
	createSimulatedVMs(t, cli, vms...)
	for _, v := range vms {
		if !s.members.owns(v.id) {
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
