package metadata

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the service's Prometheus collectors.
type metrics struct {
	requests        *prometheus.CounterVec
	latency         *prometheus.HistogramVec
	unknownSources  prometheus.Counter
	tokensIssued    prometheus.Counter
	longPollWaiters prometheus.Gauge
	connsRefused    prometheus.Counter

	// Children resolved once rather than per request (WithLabelValues
	// hashes the labels and takes a lock). Latency series exist per tree
	// from the start; a request counter is resolved on the first request
	// with its tree and code, so only codes that happened are exported.
	latencyOf  [numTrees]prometheus.Observer
	requestsOf [numTrees][maxStatus]atomic.Pointer[prometheus.Counter]
}

// maxStatus bounds the status codes whose counters are kept resolved;
// net/http refuses to write codes outside 100-999.
const maxStatus = 1000

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "minicloud_metadata_requests_total",
			Help: "Metadata requests by tree (ec2, openstack, gce, other) and HTTP status code.",
		}, []string{"tree", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "minicloud_metadata_request_duration_seconds",
			Help:    "Time to answer a metadata request, identity lookup included (GCE long-polls excluded).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .5, 1},
		}, []string{"tree"}),
		unknownSources: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "minicloud_metadata_unknown_source_total",
			Help: "Requests refused because their source maps to no local instance (or its MAC disagrees).",
		}),
		tokensIssued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "minicloud_metadata_imdsv2_tokens_issued_total",
			Help: "IMDSv2 session tokens issued.",
		}),
		longPollWaiters: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "minicloud_metadata_gce_waiters",
			Help: "GCE wait_for_change requests currently waiting.",
		}),
		connsRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "minicloud_metadata_connections_refused_total",
			Help: "Connections closed at accept because their guest, or the service, had too many open.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.latency, m.unknownSources, m.tokensIssued, m.longPollWaiters, m.connsRefused)
	}
	for t := range numTrees {
		m.latencyOf[t] = m.latency.WithLabelValues(treeNames[t])
	}
	return m
}

func (m *metrics) observe(t tree, code int, d time.Duration, longPoll bool) {
	m.requestCounter(t, code).Inc()
	if !longPoll {
		m.latencyOf[t].Observe(d.Seconds())
	}
}

// requestCounter is the requests counter of tree t and code, resolved
// once. Two requests racing to resolve it get the same child.
func (m *metrics) requestCounter(t tree, code int) prometheus.Counter {
	if code < 0 || code >= maxStatus {
		return m.requests.WithLabelValues(treeNames[t], strconv.Itoa(code))
	}
	slot := &m.requestsOf[t][code]
	if c := slot.Load(); c != nil {
		return *c
	}
	c := m.requests.WithLabelValues(treeNames[t], strconv.Itoa(code))
	slot.Store(&c)
	return c
}
