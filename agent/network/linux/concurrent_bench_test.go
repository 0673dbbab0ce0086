package linux

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/hack/benchdoc"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// BenchmarkNetworkStepOfTen is the agent's network step for ten VMs created
// at once on one network (hack/agentbench, "network"): every VM's reconcile
// ensures its network's bridge and then its own port, concurrently. One op
// is the ten ports made and then removed.
func BenchmarkNetworkStepOfTen(b *testing.B) {
	netnstest.Require(b)
	ctx := context.Background()
	br, tap := networktest.Names()
	host := netnstest.NewNS(b, "mcb-"+br)
	m := &inNS{ns: host, m: New()}
	spec := network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.230.0.1/16"), NAT: true}
	if err := m.EnsureBridge(ctx, spec); err != nil {
		b.Fatal(err)
	}
	const vms = 10
	// atOnce times one step per VM run for all VMs at once (their ports
	// removed, untimed, after each op).
	atOnce := func(step func(i int) error) func(*testing.B) {
		return func(b *testing.B) {
			cpu := processCPU(b)
			for b.Loop() {
				var wg sync.WaitGroup
				errs := make([]error, vms)
				for i := range vms {
					wg.Go(func() { errs[i] = step(i) })
				}
				wg.Wait()
				for _, err := range errs {
					if err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				for i := range vms {
					if err := m.DeletePort(ctx, scalePort(br, tap, i).TapName); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
			}
			cpu.report(b)
		}
	}
	b.Run("bridge+port", atOnce(func(i int) error {
		if err := m.EnsureBridge(ctx, spec); err != nil {
			return err
		}
		return m.EnsurePort(ctx, scalePort(br, tap, i))
	}))
	// The ports alone, all at once on the existing bridge: what the
	// ten creates do once their bridge calls have returned.
	b.Run("ports", atOnce(func(i int) error { return m.EnsurePort(ctx, scalePort(br, tap, i)) }))
	b.Run("bridge", func(b *testing.B) {
		for b.Loop() {
			if err := m.EnsureBridge(ctx, spec); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("port", func(b *testing.B) {
		for b.Loop() {
			if err := m.EnsurePort(ctx, scalePort(br, tap, 1)); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := m.DeletePort(ctx, scalePort(br, tap, 1).TapName); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
}

// cpuMeter reports the process's CPU time (user and system: nftables and
// netlink work is done by the kernel in the calling thread) per op, a
// figure the other work on a shared machine disturbs far less than the
// wall clock. It includes the untimed clean-up.
type cpuMeter struct{ start time.Duration }

func processCPU(*testing.B) *cpuMeter { return &cpuMeter{start: benchdoc.ProcessCPU()} }

func (m *cpuMeter) report(b *testing.B) {
	b.ReportMetric(float64((benchdoc.ProcessCPU()-m.start).Microseconds())/float64(b.N)/1000, "cpu-ms/op")
}
