package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// The agent's metrics. Gauges are read from the agent's state when
// scraped (fence state, last contact, assignments, work queue); only the
// reconcile durations (wall and CPU time) are recorded as passes end.
var (
	agentInfoDesc = prometheus.NewDesc("minicloud_agent_info",
		"Always 1: this agent's host name (the host label of the scheduler's minicloud_host_* metrics), hypervisor kind and version.",
		[]string{"host", "hypervisor", "version"}, nil)
	agentFencedDesc = prometheus.NewDesc("minicloud_agent_fenced",
		"1 while the agent has fenced its host (no contact for --fence-after: its domains are destroyed and nothing starts until the API confirms which VMs are still its own), else 0.",
		nil, nil)
	agentContactAgeDesc = prometheus.NewDesc("minicloud_agent_api_contact_age_seconds",
		"Seconds since the last successful registration or heartbeat with the API (since the agent started, before the first).",
		nil, nil)
	agentVMsDesc = prometheus.NewDesc("minicloud_agent_vms",
		"VMs assigned to this host, by phase as the assignment stream last delivered them (every phase is reported, 0 included).",
		[]string{"phase"}, nil)
	agentQueueDesc = prometheus.NewDesc("minicloud_agent_reconcile_queue_length",
		"VMs due for a reconcile pass that no worker has picked up yet.", nil, nil)
	agentFailingDesc = prometheus.NewDesc("minicloud_agent_reconcile_failing_vms",
		"VMs whose last reconcile pass failed (retried with backoff).", nil, nil)
)

// agentMetrics is the agent's collector.
type agentMetrics struct {
	a            *Agent
	reconcile    *prometheus.HistogramVec
	reconcileCPU *prometheus.HistogramVec
}

func newAgentMetrics(a *Agent) *agentMetrics {
	return &agentMetrics{a: a,
		reconcile: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "minicloud_agent_reconcile_duration_seconds",
			Help: "Duration of one reconcile pass over one VM, by result (ok, error: retried with backoff).",
			// From a pass that finds nothing to do (well under a millisecond)
			// to a create under TCG on a loaded host (minutes), doubling: a
			// p50 or p99 read from the buckets (Prometheus' histogram_quantile,
			// agentbench -density) is then within a factor of 2, not of 4.
			Buckets: prometheus.ExponentialBuckets(0.00025, 2, 22),
		}, []string{"result"}),
		reconcileCPU: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "minicloud_agent_reconcile_cpu_seconds",
			Help: "CPU time (user + system) of one reconcile pass over one VM, by result: the threads of the pass's own goroutines, not the time it waited (see agent/passcpu.go for what is and is not counted).",
			// A pass that changes nothing is ~150 µs of CPU over the fake
			// hypervisor: the buckets start lower than the wall time's.
			Buckets: prometheus.ExponentialBuckets(0.00001, 2, 24),
		}, []string{"result"}),
	}
}

// Collector is the agent's Prometheus collector (register it once).
func (a *Agent) Collector() prometheus.Collector { return a.metrics }

func (m *agentMetrics) observeReconcile(wall, cpu time.Duration, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.reconcile.WithLabelValues(result).Observe(wall.Seconds())
	m.reconcileCPU.WithLabelValues(result).Observe(cpu.Seconds())
}

func (m *agentMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{agentInfoDesc, agentFencedDesc, agentContactAgeDesc, agentVMsDesc, agentQueueDesc, agentFailingDesc} {
		ch <- d
	}
	m.reconcile.Describe(ch)
	m.reconcileCPU.Describe(ch)
}

func (m *agentMetrics) Collect(ch chan<- prometheus.Metric) {
	a := m.a
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	a.mu.Lock()
	hv := a.hypervisorKind
	phases := map[lifecycle.Phase]int{}
	for _, as := range a.assigned {
		phases[as.vm.GetStatus().GetPhase()]++
	}
	a.mu.Unlock()
	gauge(agentInfoDesc, 1, a.cfg.HostName, hv, a.cfg.Version)

	a.fence.mu.Lock()
	fenced, lastContact := a.fence.fenced, a.fence.lastContact
	a.fence.mu.Unlock()
	gauge(agentFencedDesc, bool01(fenced))
	gauge(agentContactAgeDesc, time.Since(lastContact).Seconds())

	for _, p := range lifecycle.Phases {
		if p != lifecycle.None {
			gauge(agentVMsDesc, float64(phases[p]), lifecycle.PhaseName(p))
		}
	}

	due, failing := a.queue.Stats()
	gauge(agentQueueDesc, float64(due))
	gauge(agentFailingDesc, float64(failing))
	m.reconcile.Collect(ch)
	m.reconcileCPU.Collect(ch)
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
