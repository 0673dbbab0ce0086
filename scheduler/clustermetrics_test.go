package scheduler

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestClusterCollectorReportsTheView: hosts in every state (up, disabled,
// down and fenced) with their own ratios, VMs placed by the scheduler and
// one it could not place; the collector reports what etcd holds, read from
// the replica's view at scrape time.
func TestClusterCollectorReportsTheView(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	registerSimulatedHost(t, cli, simHost{name: "sim-a", vcpus: 4, memMiB: 4096, diskGiB: 50}, longTTL)
	registerSimulatedHost(t, cli, simHost{name: "sim-off", vcpus: 2, memMiB: 2048, diskGiB: 20, disabled: true,
		ratios: &minicloudv1.AllocationRatios{Cpu: 1, Ram: 1.5}}, longTTL)
	registerSimulatedHost(t, cli, simHost{name: "sim-gone", vcpus: 1, memMiB: 1024, diskGiB: 10, down: true}, 0)
	fence, err := store.FenceHostTxn("sim-gone", &minicloudv1.HostFence{By: "operator"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := fence.Commit(ctx, cli); err != nil || !ok {
		t.Fatalf("fence sim-gone: ok=%v %v", ok, err)
	}
	// Before its first list of the VM statuses a replica knows no VM
	// counts: it reports none rather than zeros.
	if n := testutil.CollectAndCount(newQuietScheduler(t, cli, Config{}).ClusterCollector(), "minicloud_vms"); n != 0 {
		t.Fatalf("%d minicloud_vms series before the VMs were listed, want none", n)
	}
	s := startScheduler(t, cli, Config{})
	createSimulatedVMs(t, cli,
		simVM{id: "vm1", vcpus: 1, memMiB: 1024, diskGiB: 10},
		simVM{id: "vm2", vcpus: 2, memMiB: 512, diskGiB: 5},
		simVM{id: "vm-huge", vcpus: 64, memMiB: 512})
	for _, id := range []string{"vm1", "vm2", "vm-huge"} {
		waitDecided(t, cli, id)
	}

	const want = `
# HELP minicloud_host_allocatable What may be allocated on the host: capacity times its allocation ratio, by resource.
# TYPE minicloud_host_allocatable gauge
minicloud_host_allocatable{host="sim-a",resource="disk",unit="byte"} 5.36870912e+10
minicloud_host_allocatable{host="sim-a",resource="memory",unit="byte"} 4.294967296e+09
minicloud_host_allocatable{host="sim-a",resource="vcpu",unit="core"} 16
minicloud_host_allocatable{host="sim-gone",resource="disk",unit="byte"} 1.073741824e+10
minicloud_host_allocatable{host="sim-gone",resource="memory",unit="byte"} 1.073741824e+09
minicloud_host_allocatable{host="sim-gone",resource="vcpu",unit="core"} 4
minicloud_host_allocatable{host="sim-off",resource="disk",unit="byte"} 2.147483648e+10
minicloud_host_allocatable{host="sim-off",resource="memory",unit="byte"} 3.221225472e+09
minicloud_host_allocatable{host="sim-off",resource="vcpu",unit="core"} 2
# HELP minicloud_host_allocated What the claims of the host's VMs add up to, by resource.
# TYPE minicloud_host_allocated gauge
minicloud_host_allocated{host="sim-a",resource="disk",unit="byte"} 1.610612736e+10
minicloud_host_allocated{host="sim-a",resource="memory",unit="byte"} 1.610612736e+09
minicloud_host_allocated{host="sim-a",resource="vcpu",unit="core"} 3
minicloud_host_allocated{host="sim-gone",resource="disk",unit="byte"} 0
minicloud_host_allocated{host="sim-gone",resource="memory",unit="byte"} 0
minicloud_host_allocated{host="sim-gone",resource="vcpu",unit="core"} 0
minicloud_host_allocated{host="sim-off",resource="disk",unit="byte"} 0
minicloud_host_allocated{host="sim-off",resource="memory",unit="byte"} 0
minicloud_host_allocated{host="sim-off",resource="vcpu",unit="core"} 0
# HELP minicloud_host_capacity What the host offers before overcommit, by resource (vcpu in cores, memory and disk in bytes).
# TYPE minicloud_host_capacity gauge
minicloud_host_capacity{host="sim-a",resource="disk",unit="byte"} 5.36870912e+10
minicloud_host_capacity{host="sim-a",resource="memory",unit="byte"} 4.294967296e+09
minicloud_host_capacity{host="sim-a",resource="vcpu",unit="core"} 4
minicloud_host_capacity{host="sim-gone",resource="disk",unit="byte"} 1.073741824e+10
minicloud_host_capacity{host="sim-gone",resource="memory",unit="byte"} 1.073741824e+09
minicloud_host_capacity{host="sim-gone",resource="vcpu",unit="core"} 1
minicloud_host_capacity{host="sim-off",resource="disk",unit="byte"} 2.147483648e+10
minicloud_host_capacity{host="sim-off",resource="memory",unit="byte"} 2.147483648e+09
minicloud_host_capacity{host="sim-off",resource="vcpu",unit="core"} 2
# HELP minicloud_host_disabled 1 if an operator disabled the host (no new placements), else 0.
# TYPE minicloud_host_disabled gauge
minicloud_host_disabled{host="sim-a"} 0
minicloud_host_disabled{host="sim-gone"} 0
minicloud_host_disabled{host="sim-off"} 1
# HELP minicloud_host_fenced 1 while the host is FENCED (proved to run none of its VMs; they may be evacuated), else 0.
# TYPE minicloud_host_fenced gauge
minicloud_host_fenced{host="sim-a"} 0
minicloud_host_fenced{host="sim-gone"} 1
minicloud_host_fenced{host="sim-off"} 0
# HELP minicloud_host_up 1 while the host's heartbeat lease exists (the host is UP), else 0.
# TYPE minicloud_host_up gauge
minicloud_host_up{host="sim-a"} 1
minicloud_host_up{host="sim-gone"} 0
minicloud_host_up{host="sim-off"} 1
# HELP minicloud_host_vms VMs holding a claim on the host.
# TYPE minicloud_host_vms gauge
minicloud_host_vms{host="sim-a"} 2
minicloud_host_vms{host="sim-gone"} 0
minicloud_host_vms{host="sim-off"} 0
# HELP minicloud_vms VMs by lifecycle phase (every phase is reported, 0 included; absent while the replica lists the VMs).
# TYPE minicloud_vms gauge
minicloud_vms{phase="CREATING"} 0
minicloud_vms{phase="DELETING"} 0
minicloud_vms{phase="ERROR"} 1
minicloud_vms{phase="PENDING"} 0
minicloud_vms{phase="RUNNING"} 0
minicloud_vms{phase="SCHEDULED"} 2
minicloud_vms{phase="STOPPED"} 0
`
	// The view follows etcd through watches: wait for it to hold the
	// decisions, and fail with the last difference if it never does.
	deadline := time.Now().Add(waitTimeout)
	for {
		err := testutil.CollectAndCompare(s.ClusterCollector(), strings.NewReader(want))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster metrics never matched etcd within %s:\n%v", waitTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A host that comes back is no longer fenced, and the view says so.
	lease := heartbeat(t, cli, "sim-gone", longTTL)
	rev, _, err := store.Commit(ctx, cli, nil, store.HostUpOps("sim-gone", lease))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Snapshot().WaitApplied(ctx, rev); err != nil {
		t.Fatal(err)
	}
	const back = `
# HELP minicloud_host_fenced 1 while the host is FENCED (proved to run none of its VMs; they may be evacuated), else 0.
# TYPE minicloud_host_fenced gauge
minicloud_host_fenced{host="sim-a"} 0
minicloud_host_fenced{host="sim-gone"} 0
minicloud_host_fenced{host="sim-off"} 0
# HELP minicloud_host_up 1 while the host's heartbeat lease exists (the host is UP), else 0.
# TYPE minicloud_host_up gauge
minicloud_host_up{host="sim-a"} 1
minicloud_host_up{host="sim-gone"} 1
minicloud_host_up{host="sim-off"} 1
`
	if err := testutil.CollectAndCompare(s.ClusterCollector(), strings.NewReader(back), "minicloud_host_fenced", "minicloud_host_up"); err != nil {
		t.Fatal(err)
	}
}
