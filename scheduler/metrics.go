package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are a replica's Prometheus metrics. Pass Metrics.Observe as
// Config.Observe (wrapped if you also observe yourself).
type Metrics struct {
	decisions *prometheus.CounterVec
	latency   prometheus.Histogram
}

// NewMetrics registers the decision metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "minicloud_scheduler_decisions_total",
			Help: "Scheduling decisions by outcome: scheduled, no-valid-host, conflict (host allocation changed first), vm-changed (VM changed first), retry (only hosts full with this replica's uncommitted placements fit).",
		}, []string{"outcome"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "minicloud_scheduler_decision_seconds",
			Help:    "Duration of the pure placement decision (filters and weighers over the snapshot).",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2.5, 10), // 10µs .. ~38ms
		}),
	}
	reg.MustRegister(m.decisions, m.latency)
	return m
}

// Observe records one decision.
func (m *Metrics) Observe(o Observation) {
	m.decisions.WithLabelValues(o.Outcome).Inc()
	if o.DecideTime > 0 {
		m.latency.Observe(o.DecideTime.Seconds())
	}
}

// PendingCollector reports the number of VMs queued for a decision in
// this replica.
func (s *Scheduler) PendingCollector() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "minicloud_scheduler_pending_vms",
		Help: "VMs queued for a scheduling decision in this replica.",
	}, func() float64 { return float64(s.pending.Len()) })
}
