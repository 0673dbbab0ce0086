package placement

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkSchedule measures one decision on clusters of simulated hosts
// (in-memory Host values, no agents) that are about half full, with a mix
// of zones, hypervisors and a few hosts down.
func BenchmarkSchedule(b *testing.B) {
	for _, n := range []int{1000, 5000, 10000} {
		for _, sample := range []int{0, -1} {
			name := fmt.Sprintf("hosts=%d/sample=%d", n, DefaultSampleSize)
			if sample < 0 {
				name = fmt.Sprintf("hosts=%d/sample=all", n)
			}
			b.Run(name, func(b *testing.B) {
				rng := rand.New(rand.NewPCG(1, 2))
				c := simulatedCluster(n, rng)
				p, _ := NewPolicy(Spread)
				p.SampleSize = sample
				req := &Request{Resources: Resources{VCPUs: 2, MemoryMiB: 2048, DiskGiB: 20}, Zone: "az1"}
				b.ReportAllocs()
				for b.Loop() {
					if _, err := Schedule(c, req, p, rng); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func simulatedCluster(n int, rng *rand.Rand) *Cluster {
	var hosts []*Host
	for i := range n {
		h := &Host{
			Name: fmt.Sprintf("sim-%05d", i), Zone: fmt.Sprintf("az%d", 1+i%2), Hypervisors: []string{"kvm", "tcg"},
			Up: i%50 != 0, Capacity: Resources{VCPUs: 32, MemoryMiB: 131072, DiskGiB: 2000},
			Ratios: Ratios{CPU: 4, RAM: 1, Disk: 1},
		}
		h.Allocated = Resources{VCPUs: int64(rng.IntN(128)), MemoryMiB: int64(rng.IntN(131072)), DiskGiB: int64(rng.IntN(2000))}
		hosts = append(hosts, h)
	}
	return clusterOf(hosts...)
}

// BenchmarkSchedulePreferred is BenchmarkSchedule for one of two replicas
// that split the hosts (Cluster.Preferred), at the default sample size.
func BenchmarkSchedulePreferred(b *testing.B) {
	for _, n := range []int{1000, 5000, 10000} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(1, 2))
			c := simulatedCluster(n, rng)
			for i, h := range c.Hosts {
				h.Preferred = i%2 == 0
			}
			c.Partitioned = true
			p, _ := NewPolicy(Spread)
			req := &Request{Resources: Resources{VCPUs: 2, MemoryMiB: 2048, DiskGiB: 20}, Zone: "az1"}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Schedule(c, req, p, rng); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
