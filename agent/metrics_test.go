package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestAgentMetrics: the agent's collector reports what its state holds
// when scraped: its assignments by phase (the failing VM got as far as
// CREATING), a VM whose pass failed, the
// passes it timed by result (wall and CPU time), the age of its last contact, and the fence.
func TestAgentMetrics(t *testing.T) {
	h := newHarness(t)
	h.a.cfg.Version = "v-test"
	h.running()
	h.disks.fail(errors.New("qemu-img: disk full"))
	failing := h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	if _, err := h.pass(failing); err == nil {
		t.Fatal("reconcile succeeded with a failing disk")
	}
	h.a.fence.mu.Lock()
	h.a.fence.lastContact = time.Now().Add(-time.Hour)
	h.a.fence.mu.Unlock()

	if problems, err := testutil.CollectAndLint(h.a.Collector()); err != nil || len(problems) > 0 {
		t.Fatalf("promlint: %v %v", problems, err)
	}
	const want = `
# HELP minicloud_agent_fenced 1 while the agent has fenced its host (no contact for --fence-after: its domains are destroyed and nothing starts until the API confirms which VMs are still its own), else 0.
# TYPE minicloud_agent_fenced gauge
minicloud_agent_fenced 0
# HELP minicloud_agent_info Always 1: this agent's host name (the host label of the scheduler's minicloud_host_* metrics), hypervisor kind and version.
# TYPE minicloud_agent_info gauge
minicloud_agent_info{host="host1",hypervisor="tcg",version="v-test"} 1
# HELP minicloud_agent_reconcile_failing_vms VMs whose last reconcile pass failed (retried with backoff).
# TYPE minicloud_agent_reconcile_failing_vms gauge
minicloud_agent_reconcile_failing_vms 1
# HELP minicloud_agent_reconcile_queue_length VMs due for a reconcile pass that no worker has picked up yet.
# TYPE minicloud_agent_reconcile_queue_length gauge
minicloud_agent_reconcile_queue_length 0
# HELP minicloud_agent_vms VMs assigned to this host, by phase as the assignment stream last delivered them (every phase is reported, 0 included).
# TYPE minicloud_agent_vms gauge
minicloud_agent_vms{phase="CREATING"} 1
minicloud_agent_vms{phase="DELETING"} 0
minicloud_agent_vms{phase="ERROR"} 0
minicloud_agent_vms{phase="PENDING"} 0
minicloud_agent_vms{phase="RUNNING"} 1
minicloud_agent_vms{phase="SCHEDULED"} 0
minicloud_agent_vms{phase="STOPPED"} 0
`
	if err := testutil.CollectAndCompare(h.a.Collector(), strings.NewReader(want), "minicloud_agent_fenced", "minicloud_agent_info",
		"minicloud_agent_reconcile_failing_vms", "minicloud_agent_reconcile_queue_length", "minicloud_agent_vms"); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(h.a.Collector())
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	passes, cpuPasses := map[string]uint64{}, map[string]uint64{}
	var age, cpu float64
	for _, f := range families {
		for _, m := range f.GetMetric() {
			switch f.GetName() {
			case "minicloud_agent_reconcile_duration_seconds":
				passes[m.GetLabel()[0].GetValue()] = m.GetHistogram().GetSampleCount()
			case "minicloud_agent_reconcile_cpu_seconds":
				cpuPasses[m.GetLabel()[0].GetValue()] = m.GetHistogram().GetSampleCount()
				cpu += m.GetHistogram().GetSampleSum()
			case "minicloud_agent_api_contact_age_seconds":
				age = m.GetGauge().GetValue()
			}
		}
	}
	// The running VM took at least one good pass; the failing one, one bad.
	if passes["ok"] < 1 || passes["error"] != 1 {
		t.Fatalf("reconcile passes by result %v, want ok >= 1 and error 1", passes)
	}
	// Every timed pass has its CPU time too, and a pass is never free.
	if cpuPasses["ok"] != passes["ok"] || cpuPasses["error"] != passes["error"] || cpu <= 0 {
		t.Fatalf("CPU-timed passes by result %v (%v s in all), want those of the wall-time histogram %v and more than 0 s", cpuPasses, cpu, passes)
	}
	if age < time.Hour.Seconds() {
		t.Fatalf("api contact age %v, want at least an hour", age)
	}

	h.runFenceLoop(time.Millisecond)
	waitFor(t, "the fence", h.a.fenced)
	fenced := `
# HELP minicloud_agent_fenced 1 while the agent has fenced its host (no contact for --fence-after: its domains are destroyed and nothing starts until the API confirms which VMs are still its own), else 0.
# TYPE minicloud_agent_fenced gauge
minicloud_agent_fenced 1
`
	if err := testutil.CollectAndCompare(h.a.Collector(), strings.NewReader(fenced), "minicloud_agent_fenced"); err != nil {
		t.Fatal(err)
	}
}
