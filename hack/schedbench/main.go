// Command schedbench measures the real scheduler against a real embedded
// etcd with simulated hosts and simulated API load, and rewrites the
// scheduler section of docs/benchmarks.md.
//
// What is simulated, and how:
//   - Hosts: fake agents that only register (hosts/spec/<name>) and hold a
//     heartbeat lease (hosts/alive/<name>, kept alive by this process), as
//     the API writes them for a real agent. No libvirt, no VMs run.
//   - API load: VMs are written as PENDING (vms/spec + vms/status in one
//     transaction), exactly as the API's CreateVM writes them, in bursts.
//
// Everything else is real: the scheduler replicas (scheduler.New/Run, each
// with its own etcd client as separate processes would have), the etcd
// server (embedded, on disk, with fsync), the watches and the claim
// transactions. At the end every scenario is checked with
// scheduler.VerifyClaims (no host beyond its ratios, allocations equal to
// the sum of claims).
//
//	go run ./hack/schedbench            # 1,000 and 5,000 hosts, 10,000 VMs, 1 and 2 replicas
//	go run ./hack/schedbench --quick    # 1,000 hosts, 2,000 VMs
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/hack/benchdoc"
	"github.com/minicloud/minicloud/pkg/etcdembed"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler"
	"github.com/minicloud/minicloud/scheduler/placement"
)

type options struct {
	hosts    []int
	replicas []int
	vms      int
	burst    int
	workers  int
	docs     string
	seed     uint64
	// loadBefore is /proc/loadavg's 1-minute figure when the run started.
	loadBefore string
}

func main() {
	var o options
	quick := flag.Bool("quick", false, "small run: 1,000 hosts, 2,000 VMs (about 20 s)")
	hosts := flag.String("hosts", "1000,5000", "simulated host counts, comma separated")
	replicas := flag.String("replicas", "1,2", "scheduler replica counts, comma separated")
	flag.IntVar(&o.vms, "vms", 10000, "VMs created per scenario")
	flag.IntVar(&o.burst, "burst", 1000, "VMs per burst; the next burst starts when the previous one is decided")
	flag.IntVar(&o.workers, "workers", scheduler.DefaultWorkers, "workers per scheduler replica")
	flag.StringVar(&o.docs, "docs", "docs/benchmarks.md", "file whose scheduler section is rewritten (empty: print only)")
	flag.Uint64Var(&o.seed, "seed", 1, "random seed of the simulated hosts and VMs")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run (etcd, schedulers, load) to this file")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "schedbench:", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
	}
	var err error
	if o.hosts, err = benchdoc.Counts(*hosts); err == nil {
		o.replicas, err = benchdoc.Counts(*replicas)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "schedbench:", err)
		os.Exit(2)
	}
	if *quick {
		o.hosts, o.vms = []int{1000}, 2000
	}
	o.loadBefore = "unknown"
	if raw, err := os.ReadFile("/proc/loadavg"); err == nil {
		o.loadBefore = strings.Fields(string(raw))[0]
	}
	if err := run(o, *quick); err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, "schedbench:", err)
		os.Exit(1)
	}
}

func run(o options, quick bool) error {
	var results []result
	start := time.Now()
	for _, h := range o.hosts {
		for _, r := range o.replicas {
			res, err := scenario(o, h, r)
			if err != nil {
				return fmt.Errorf("%d hosts, %d replicas: %w", h, r, err)
			}
			fmt.Println(res.row())
			results = append(results, res)
		}
	}
	pure := pureDecisions(o.seed)
	table := render(results, o, quick, time.Since(start)) + "\n" + pure
	fmt.Println(table)
	if o.docs == "" {
		return nil
	}
	if err := benchdoc.RewriteSection(o.docs, "scheduler", table); err != nil {
		return err
	}
	fmt.Println("rewrote the scheduler section of", o.docs)
	violations := 0
	for _, r := range results {
		violations += r.violations
	}
	if violations > 0 {
		return fmt.Errorf("%d capacity/claim violations (see above)", violations)
	}
	return nil
}

type result struct {
	hosts, replicas, vms int
	placed, noValidHost  int
	wall                 time.Duration
	decide, e2e          []time.Duration
	conflicts, vmChanged int64
	violations           int
}

func (r result) placementsPerSec() float64 {
	return float64(r.placed+r.noValidHost) / r.wall.Seconds()
}

func (r result) row() string {
	return fmt.Sprintf("| %d | %d | %d | %d | %d | %.1f | %.0f | %s | %s | %s | %s | %d / %d | %d |",
		r.hosts, r.replicas, r.vms, r.placed, r.noValidHost, r.wall.Seconds(), r.placementsPerSec(),
		pct(r.decide, 50), pct(r.decide, 99), pct(r.e2e, 50), pct(r.e2e, 99), r.conflicts, r.vmChanged, r.violations)
}

func pct(d []time.Duration, p int) string {
	if len(d) == 0 {
		return "-"
	}
	s := slices.Clone(d)
	slices.Sort(s)
	v := s[min(len(s)-1, len(s)*p/100)]
	switch {
	case v < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(v)/float64(time.Microsecond))
	case v < time.Second:
		return fmt.Sprintf("%.1f ms", float64(v)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", v.Seconds())
}

func render(rs []result, o options, quick bool, total time.Duration) string {
	var b strings.Builder
	mode := ""
	if quick {
		mode = " --quick"
	}
	fmt.Fprintf(&b, "Written by `go run ./hack/schedbench%s` on %s (%d CPUs, %s) in %.0f s; load average before the run: %s (the machine is shared, so throughput varies with it).\n",
		mode, time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), runtime.Version(), total.Seconds(), o.loadBefore)
	fmt.Fprintf(&b, "Real scheduler replicas (%d workers each, sample size default) and a real embedded etcd on disk in one process;\n", o.workers)
	b.WriteString("simulated hosts (registration + heartbeat lease, no libvirt; random 8-32 vCPUs, 16-64 GiB, 2 zones, 2% down, 1% disabled)\n")
	fmt.Fprintf(&b, "and simulated API load (PENDING VMs written as CreateVM writes them, bursts of %d, four flavors of 1-4 vCPUs / 0.5-8 GiB).\n", o.burst)
	b.WriteString("Decision = the pure `placement.Schedule` call; end-to-end = PENDING written to SCHEDULED/ERROR observed by a watch (includes queueing behind the burst).\n")
	b.WriteString("Placements/s counts every decided VM over the wall time from the first create to the last decision. Violations: `scheduler.VerifyClaims` at the end (hosts over their ratios, allocations != sum of claims).\n\n")
	b.WriteString("| hosts | replicas | VMs | placed | no valid host | wall s | placements/s | decision p50 | decision p99 | end-to-end p50 | end-to-end p99 | lost races (host / VM) | violations |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		b.WriteString(r.row() + "\n")
	}
	return b.String()
}

// pureDecisions times placement.Schedule alone (no etcd, no other
// goroutines of ours) on in-memory simulated clusters of 1,000, 5,000 and
// 10,000 hosts, about half allocated, with the default sample bound and
// with every feasible host ranked.
func pureDecisions(seed uint64) string {
	var b strings.Builder
	b.WriteString("Pure decision (`placement.Schedule` on an in-memory simulated cluster about half allocated, 5,000 decisions each; `go test -bench . ./scheduler/placement` measures the same):\n\n")
	b.WriteString("| hosts | sample | p50 | p99 | max |\n|---|---|---|---|---|\n")
	for _, n := range []int{1000, 5000, 10000} {
		for _, sample := range []int{0, -1} {
			rng := rand.New(rand.NewPCG(seed, uint64(n)))
			c := placement.NewCluster()
			for i := range n {
				h := &placement.Host{
					Name: fmt.Sprintf("sim-%05d", i), Zone: fmt.Sprintf("az%d", 1+i%2), Hypervisors: []string{"kvm", "tcg"}, Up: i%50 != 0,
					Capacity: placement.Resources{VCPUs: int64(8 * (1 + rng.IntN(4))), MemoryMiB: int64(16384 * (1 + rng.IntN(4))), DiskGiB: 2000},
					Ratios:   placement.Ratios{CPU: placement.DefaultCPURatio, RAM: placement.DefaultRAMRatio, Disk: placement.DefaultDiskRatio},
				}
				h.Allocated = placement.Resources{VCPUs: int64(rng.IntN(int(2 * h.Capacity.VCPUs))), MemoryMiB: int64(rng.IntN(int(h.Capacity.MemoryMiB))), DiskGiB: int64(rng.IntN(1000))}
				c.Hosts = append(c.Hosts, h)
				c.ByName[h.Name] = h
			}
			p, _ := placement.NewPolicy(placement.Spread)
			p.SampleSize = sample
			var d []time.Duration
			for i := range 5000 {
				req := &placement.Request{Resources: placement.ResourcesFromProto(flavors[i%len(flavors)])}
				t0 := time.Now()
				_, _ = placement.Schedule(c, req, p, rng)
				d = append(d, time.Since(t0))
			}
			label := fmt.Sprint(placement.DefaultSampleSize)
			if sample < 0 {
				label = "all"
			}
			fmt.Fprintf(&b, "| %d | %s | %s | %s | %s |\n", n, label, pct(d, 50), pct(d, 99), pct(d, 100))
		}
	}
	return b.String()
}

// counter counts strings concurrently.
type counter struct {
	mu sync.Mutex
	m  map[string]int
}

func newCounter() *counter { return &counter{m: map[string]int{}} }

func (c *counter) Add(s string) {
	c.mu.Lock()
	c.m[s]++
	c.mu.Unlock()
}

func (c *counter) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.m)
}

var flavors = []*minicloudv1.Resources{
	{Vcpus: 1, MemoryMib: 512, DiskGib: 1},
	{Vcpus: 1, MemoryMib: 2048, DiskGib: 10},
	{Vcpus: 2, MemoryMib: 4096, DiskGib: 20},
	{Vcpus: 4, MemoryMib: 8192, DiskGib: 40},
}

func scenario(o options, nHosts, nReplicas int) (result, error) {
	res := result{hosts: nHosts, replicas: nReplicas, vms: o.vms}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, err := os.MkdirTemp("", "schedbench-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	srv, err := etcdembed.Start(ctx, etcdembed.Config{Dir: dir, ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0", Quiet: true})
	if err != nil {
		return res, err
	}
	defer srv.Close()
	newClient := func() (*clientv3.Client, error) {
		return clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	}
	cli, err := newClient()
	if err != nil {
		return res, err
	}
	defer cli.Close()
	rng := rand.New(rand.NewPCG(o.seed, uint64(nHosts)))
	if err := registerSimulatedHosts(ctx, cli, nHosts, rng); err != nil {
		return res, err
	}

	// Scheduler replicas, each on its own client.
	var mu sync.Mutex
	var conflicts, vmChanged atomic.Int64
	outcomes := newCounter()
	observe := func(ob scheduler.Observation) {
		outcomes.Add(ob.Outcome)
		switch ob.Outcome {
		case "conflict":
			conflicts.Add(1)
		case "vm-changed":
			vmChanged.Add(1)
		}
		if ob.DecideTime > 0 {
			mu.Lock()
			res.decide = append(res.decide, ob.DecideTime)
			mu.Unlock()
		}
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for i := range nReplicas {
		rc, err := newClient()
		if err != nil {
			return res, err
		}
		defer rc.Close()
		s, err := scheduler.New(rc, scheduler.Config{Workers: o.workers, Source: fmt.Sprintf("scheduler-%d", i), Log: quiet, Observe: observe})
		if err != nil {
			return res, err
		}
		wg.Go(func() { _ = s.Run(ctx) })
		for _, ready := range []<-chan struct{}{s.Snapshot().Synced(), s.Joined()} {
			select {
			case <-ready:
			case <-time.After(time.Minute):
				return res, fmt.Errorf("replica %d did not start", i)
			}
		}
	}

	// Watch decisions.
	created := make([]time.Time, o.vms)
	decided := make([]bool, o.vms)
	var decidedCount atomic.Int64
	progress := make(chan struct{}, 1)
	wresp, err := cli.Get(ctx, "bench-start")
	if err != nil {
		return res, err
	}
	var e2eMu sync.Mutex
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for wr := range cli.Watch(ctx, store.VMStatusPrefix, clientv3.WithPrefix(), clientv3.WithRev(wresp.Header.Revision+1)) {
			now := time.Now()
			for _, ev := range wr.Events {
				st := &minicloudv1.VMStatus{}
				if proto.Unmarshal(ev.Kv.Value, st) != nil {
					continue
				}
				ph := st.GetPhase()
				if ph != minicloudv1.VMPhase_VM_PHASE_SCHEDULED && ph != minicloudv1.VMPhase_VM_PHASE_ERROR {
					continue
				}
				i, err := strconv.Atoi(strings.TrimPrefix(store.LastSegment(string(ev.Kv.Key)), "simvm-"))
				if err != nil {
					continue
				}
				e2eMu.Lock()
				if !decided[i] {
					decided[i] = true
					res.e2e = append(res.e2e, now.Sub(created[i]))
					if ph == minicloudv1.VMPhase_VM_PHASE_SCHEDULED {
						res.placed++
					} else {
						res.noValidHost++
					}
				}
				e2eMu.Unlock()
				decidedCount.Add(1)
				select {
				case progress <- struct{}{}:
				default:
				}
			}
		}
	}()

	// Simulated API load, burst by burst.
	begin := time.Now()
	for b := 0; b < o.vms; b += o.burst {
		n := min(o.burst, o.vms-b)
		if err := createSimulatedVMs(ctx, cli, b, n, created, &e2eMu, rng); err != nil {
			return res, err
		}
		deadline := time.After(2 * time.Minute)
		for int(decidedCount.Load()) < b+n {
			select {
			case <-progress:
			case <-deadline:
				return res, fmt.Errorf("burst at %d: only %d of %d VMs decided after 2 minutes", b, decidedCount.Load(), b+n)
			}
		}
	}
	res.wall = time.Since(begin)
	res.conflicts, res.vmChanged = conflicts.Load(), vmChanged.Load()
	fmt.Fprintf(os.Stderr, "%d hosts, %d replicas: decisions by outcome %v\n", nHosts, nReplicas, outcomes.snapshot())
	violations, err := scheduler.VerifyClaims(ctx, cli)
	if err != nil {
		return res, err
	}
	for i, v := range violations {
		if i < 20 {
			fmt.Fprintln(os.Stderr, "VIOLATION:", v)
		}
	}
	res.violations = len(violations)
	cancel()
	<-watchDone
	return res, nil
}

// registerSimulatedHosts writes n fake agents' registrations and alive keys,
// each on its own lease kept alive by this process (as a real agent's
// heartbeats keep its lease alive through the API).
func registerSimulatedHosts(ctx context.Context, cli *clientv3.Client, n int, rng *rand.Rand) error {
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		_, err := cli.Txn(ctx).Then(ops...).Commit()
		ops = ops[:0]
		return err
	}
	for i := range n {
		name := fmt.Sprintf("sim-%05d", i)
		h := &minicloudv1.Host{
			Meta:             &minicloudv1.ObjectMeta{Name: name},
			Address:          "simulated",
			AgentVersion:     "simulated",
			Capacity:         &minicloudv1.Resources{Vcpus: int32(8 * (1 + rng.IntN(4))), MemoryMib: int64(16384 * (1 + rng.IntN(4))), DiskGib: 2000},
			Hypervisors:      []string{"kvm", "tcg"},
			AvailabilityZone: fmt.Sprintf("az%d", 1+i%2),
			Disabled:         i%100 == 1,
		}
		b, err := proto.Marshal(h)
		if err != nil {
			return err
		}
		ops = append(ops, clientv3.OpPut(store.HostSpecKey(name), string(b)))
		if i%50 != 0 { // 2% of the hosts are down: registered, no lease
			l, err := cli.Grant(ctx, 30)
			if err != nil {
				return fmt.Errorf("grant lease of %s: %w", name, err)
			}
			ka, err := cli.KeepAlive(ctx, l.ID)
			if err != nil {
				return fmt.Errorf("keep lease of %s alive: %w", name, err)
			}
			go func() {
				for range ka {
				}
			}()
			ops = append(ops, clientv3.OpPut(store.HostAliveKey(name), strconv.FormatInt(int64(l.ID), 10), clientv3.WithLease(l.ID)))
		}
		if len(ops) >= 100 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// createSimulatedVMs writes VMs [first, first+n) as the API's CreateVM
// does (spec + PENDING status in one transaction), from 8 concurrent
// simulated API clients, 16 VMs per transaction.
func createSimulatedVMs(ctx context.Context, cli *clientv3.Client, first, n int, created []time.Time, mu *sync.Mutex, rng *rand.Rand) error {
	type vm struct {
		i        int
		spec, st string
	}
	var vms []vm
	for i := first; i < first+n; i++ {
		id := fmt.Sprintf("simvm-%d", i)
		spec := &minicloudv1.VMSpec{Image: "simulated", Flavor: "simulated", Resources: flavors[rng.IntN(len(flavors))]}
		if rng.IntN(5) == 0 {
			spec.AvailabilityZone = "az2"
		}
		b, err := proto.Marshal(&minicloudv1.VM{Meta: &minicloudv1.ObjectMeta{Id: id, Name: id, Project: "bench"}, Spec: spec})
		if err != nil {
			return err
		}
		s, err := proto.Marshal(&minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_PENDING})
		if err != nil {
			return err
		}
		vms = append(vms, vm{i, string(b), string(s)})
	}
	const perTxn, clients = 16, 8
	work := make(chan []vm)
	errs := make(chan error, clients)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for batch := range work {
				var ops []clientv3.Op
				for _, v := range batch {
					id := fmt.Sprintf("simvm-%d", v.i)
					ops = append(ops, clientv3.OpPut(store.VMSpecKey(id), v.spec), clientv3.OpPut(store.VMStatusKey(id), v.st))
				}
				now := time.Now()
				mu.Lock()
				for _, v := range batch {
					created[v.i] = now
				}
				mu.Unlock()
				if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for i := 0; i < len(vms); i += perTxn {
		work <- vms[i:min(i+perTxn, len(vms))]
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return fmt.Errorf("simulated create: %w", err)
	default:
		return nil
	}
}
