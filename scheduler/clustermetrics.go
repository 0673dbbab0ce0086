package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/scheduler/placement"
)

// The cluster's state as gauges: hosts (liveness, fencing, capacity,
// allocations) and VMs by phase. The scheduler exports them because it is
// the component that already holds all of it in memory, from its watches
// (the snapshot and the VM status cache): a scrape reads that memory and
// never etcd. Every replica exports the same view; aggregate across
// replicas with max (docs/operations.md).
//
// Resources follow kube-state-metrics' node metrics: one family per
// quantity, a resource and a unit label, memory and disk in bytes.
var (
	hostUpDesc = prometheus.NewDesc("minicloud_host_up",
		"1 while the host's heartbeat lease exists (the host is UP), else 0.", []string{"host"}, nil)
	hostDisabledDesc = prometheus.NewDesc("minicloud_host_disabled",
		"1 if an operator disabled the host (no new placements), else 0.", []string{"host"}, nil)
	hostFencedDesc = prometheus.NewDesc("minicloud_host_fenced",
		"1 while the host is FENCED (proved to run none of its VMs; they may be evacuated), else 0.", []string{"host"}, nil)
	hostCapacityDesc = prometheus.NewDesc("minicloud_host_capacity",
		"What the host offers before overcommit, by resource (vcpu in cores, memory and disk in bytes).", []string{"host", "resource", "unit"}, nil)
	hostAllocatableDesc = prometheus.NewDesc("minicloud_host_allocatable",
		"What may be allocated on the host: capacity times its allocation ratio, by resource.", []string{"host", "resource", "unit"}, nil)
	hostAllocatedDesc = prometheus.NewDesc("minicloud_host_allocated",
		"What the claims of the host's VMs add up to, by resource.", []string{"host", "resource", "unit"}, nil)
	hostVMsDesc = prometheus.NewDesc("minicloud_host_vms",
		"VMs holding a claim on the host.", []string{"host"}, nil)
	vmsDesc = prometheus.NewDesc("minicloud_vms",
		"VMs by lifecycle phase (every phase is reported, 0 included; absent while the replica lists the VMs).", []string{"phase"}, nil)
)

// clusterCollector reads the replica's view at scrape time.
type clusterCollector struct{ s *Scheduler }

// ClusterCollector reports the cluster's hosts and VMs as this replica
// sees them (see the variables above for the families).
func (s *Scheduler) ClusterCollector() prometheus.Collector { return clusterCollector{s} }

func (c clusterCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{hostUpDesc, hostDisabledDesc, hostFencedDesc,
		hostCapacityDesc, hostAllocatableDesc, hostAllocatedDesc, hostVMsDesc, vmsDesc} {
		ch <- d
	}
}

func (c clusterCollector) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.s.snap.Hosts() {
		gauge := func(d *prometheus.Desc, v float64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{h.Name}, labels...)...)
		}
		gauge(hostUpDesc, bool01(h.Up))
		gauge(hostDisabledDesc, bool01(h.Disabled))
		gauge(hostFencedDesc, bool01(h.Fenced))
		gauge(hostVMsDesc, float64(h.VMCount))
		for _, q := range []struct {
			d *prometheus.Desc
			r placement.Resources
		}{{hostCapacityDesc, h.Capacity}, {hostAllocatableDesc, h.Limits()}, {hostAllocatedDesc, h.Allocated}} {
			gauge(q.d, float64(q.r.VCPUs), "vcpu", "core")
			gauge(q.d, float64(q.r.MemoryMiB)*(1<<20), "memory", "byte")
			gauge(q.d, float64(q.r.DiskGiB)*(1<<30), "disk", "byte")
		}
	}
	counts, ok := c.s.phaseCounts()
	if !ok {
		return // no series rather than wrong ones: Prometheus shows a gap
	}
	for _, p := range lifecycle.Phases {
		if p == lifecycle.None {
			continue
		}
		ch <- prometheus.MustNewConstMetric(vmsDesc, prometheus.GaugeValue, float64(counts[p]), lifecycle.PhaseName(p))
	}
}

// phaseCounts counts the VMs of the status cache by phase; ok is false
// while the cache is not a complete list (before the first list, and
// while it refills after a failed watch), when counts would be too low.
func (s *Scheduler) phaseCounts() (counts map[lifecycle.Phase]int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.listed {
		return nil, false
	}
	counts = map[lifecycle.Phase]int{}
	for _, e := range s.vms {
		counts[e.status.GetPhase()]++
	}
	return counts, true
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
