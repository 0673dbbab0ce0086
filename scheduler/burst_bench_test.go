package scheduler

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// BenchmarkTenCreatesOnOneHost is the schedule step of hack/agentbench's
// "ten at once" row without the rest of minicloud: ten VMs written PENDING
// at the same moment, each in its own transaction as the API's CreateVM
// writes it, on a cluster of one host. It reports the create → SCHEDULED
// time (p50 and max over the ten, seen through a watch), the create's own
// write, the etcd revisions the placements used (one per commit) and the
// decisions retried because the host was full only with uncommitted
// placements ("retry").
func BenchmarkTenCreatesOnOneHost(b *testing.B) {
	_, cli := etcdtest.Start(b)
	registerSimulatedHost(b, cli, simHost{name: "sim-a", vcpus: 1 << 12, memMiB: 1 << 22, diskGiB: 1 << 16}, longTTL)
	var busy atomic.Int64
	startScheduler(b, cli, Config{Observe: func(o Observation) {
		if o.Outcome == "retry" {
			busy.Add(1)
		}
	}})
	ctx := context.Background()
	var p50s, maxes, commits, writes []float64
	b.ResetTimer()
	for i := range b.N {
		ids := make([]string, 10)
		for j := range ids {
			ids[j] = fmt.Sprintf("vm-%d-%d", i, j)
		}
		wctx, cancel := context.WithCancel(ctx)
		w := cli.Watch(wctx, store.VMStatusPrefix, clientv3.WithPrefix())
		var created, written [10]time.Time
		var firstRev atomic.Int64
		var wg sync.WaitGroup
		for j, id := range ids {
			wg.Go(func() {
				created[j] = time.Now()
				resp, err := cli.Txn(ctx).Then(simulatedCreateOps(b, simVM{id: id, vcpus: 1, memMiB: 256, diskGiB: 1})...).Commit()
				if err != nil {
					b.Error(err)
					return
				}
				written[j] = time.Now()
				firstRev.CompareAndSwap(0, resp.Header.Revision)
			})
		}
		wg.Wait()
		lat := map[string]time.Duration{}
		var lastRev int64
		for len(lat) < len(ids) {
			wr := <-w
			for _, ev := range wr.Events {
				st := &minicloudv1.VMStatus{}
				if err := store.Decode(ev.Kv, st); err != nil {
					b.Fatal(err)
				}
				id := store.LastSegment(string(ev.Kv.Key))
				if st.GetPhase() == lifecycle.Scheduled {
					for j := range ids {
						if ids[j] == id {
							lat[id] = time.Since(created[j])
						}
					}
					lastRev = max(lastRev, ev.Kv.ModRevision)
				}
			}
		}
		cancel()
		var ls []float64
		for _, d := range lat {
			ls = append(ls, float64(d.Microseconds())/1000)
		}
		sort.Float64s(ls)
		p50s = append(p50s, ls[len(ls)/2])
		var ws []float64
		for j := range ids {
			ws = append(ws, float64(written[j].Sub(created[j]).Microseconds())/1000)
		}
		sort.Float64s(ws)
		writes = append(writes, ws[len(ws)/2])
		maxes = append(maxes, ls[len(ls)-1])
		// Ten creates take ten revisions; the rest are placements.
		commits = append(commits, float64(lastRev-firstRev.Load()-9))
	}
	b.ReportMetric(mean(p50s), "p50-ms")
	b.ReportMetric(mean(maxes), "max-ms")
	b.ReportMetric(mean(writes), "create-write-p50-ms")
	b.ReportMetric(mean(commits), "revisions/10")
	b.ReportMetric(float64(busy.Load())/float64(b.N), "retries/10")
	checkClaimInvariants(b, cli)
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}
