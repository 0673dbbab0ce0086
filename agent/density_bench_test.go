package agent_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/minicloud/minicloud/agent"
	"github.com/minicloud/minicloud/agent/guestservices"
	"github.com/minicloud/minicloud/agent/guestservices/dhcpserver"
	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	"github.com/minicloud/minicloud/metadata"
)

// BenchmarkDensity is the per-pass cost of an agent as its host fills
// (issue 15, section 4): an agent over the fake hypervisor, network and
// API, with the real guest services (metadata directory, DHCP leases, DNS
// zones; not serving, so no root), holding N running VMs. Each op is
//
//   - reconcile: one reconcile pass of a running VM (the periodic resync,
//     or a domain event), which publishes the guests;
//   - publish: one spec write (a new tag) and the publish the assignment
//     event makes of it.
//
// Besides ns/op it reports the p50 and p99 of one op in µs, of wall time
// and of CPU time;
// hack/densitybench runs it and writes the table into docs/benchmarks.md.
// The cost must not grow with N.
func BenchmarkDensity(b *testing.B) {
	for _, n := range []int{10, 50, 1000} {
		b.Run(fmt.Sprintf("vms=%d", n), func(b *testing.B) {
			rig, ids := densityRig(b, n)
			b.Run("reconcile", func(b *testing.B) {
				measure(b, func(i int) {
					if err := rig.Reconcile(ids[i%len(ids)]); err != nil {
						b.Fatal(err)
					}
				})
			})
			b.Run("publish", func(b *testing.B) {
				measure(b, func(i int) {
					rig.WriteSpec(ids[i%len(ids)])
					rig.Publish()
				})
			})
		})
	}
}

func densityRig(b *testing.B, n int) (*agent.DensityRig, []string) {
	b.Helper()
	dir := metadata.NewDirectory()
	md, err := metadata.NewServer(dir, metadata.Options{})
	if err != nil {
		b.Fatal(err)
	}
	rig := agent.NewDensityRig(b, guestservices.New(dir, md, dhcpserver.New(), dnsserver.New()))
	ids := make([]string, n)
	for i := range ids {
		ids[i] = rig.AddRunningVM(i)
	}
	if dir.Len() != n {
		b.Fatalf("metadata directory holds %d instances, want %d", dir.Len(), n)
	}
	return rig, ids
}

// measure runs op b.N times and reports the p50 and p99 of one run, in
// wall time and in the CPU time of the thread it ran on (locked to it, as
// the agent times its passes: agent/passcpu.go).
func measure(b *testing.B, op func(i int)) {
	took, cpu := make([]time.Duration, b.N), make([]time.Duration, b.N)
	b.ResetTimer()
	for i := range b.N {
		start := time.Now()
		cpu[i] = agent.OnThisThread(func() { op(i) })
		took[i] = time.Since(start)
	}
	b.StopTimer()
	report := func(ds []time.Duration, unit string) {
		slices.Sort(ds)
		b.ReportMetric(float64(ds[len(ds)/2].Nanoseconds())/1e3, "p50-"+unit)
		b.ReportMetric(float64(ds[len(ds)*99/100].Nanoseconds())/1e3, "p99-"+unit)
	}
	report(took, "µs")
	report(cpu, "cpu-µs")
}
