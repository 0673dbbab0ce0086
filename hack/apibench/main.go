// Command apibench measures the API's VM create path: an embedded etcd and
// the API server in this process, N concurrent gRPC clients creating VMs
// for a fixed time. Next to each API row it measures raw etcd
// transactions of a create's shape on the same etcd with as many clients,
// so the ratio of the two is in every run. It reports latency (p50/p99),
// operations/s and the etcd work per create, and rewrites the "api"
// section of docs/benchmarks.md.
//
// With -fill it measures instead how creates/s changes as the network
// fills: it creates VMs through the API until the network holds each
// given count, measures raw etcd transactions and then creates/s there
// (the ratio of the two at each fill), and rewrites the "api-fill"
// section.
//
//	go run ./hack/apibench [-clients 16,64] [-duration 10s] [-docs docs/benchmarks.md]
//	go run ./hack/apibench -fill 1000,50000 [-clients 64] [-duration 5s]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/hack/benchdoc"
	"github.com/minicloud/minicloud/pkg/store"
)

func main() {
	clientsFlag := flag.String("clients", "16,64", "concurrent clients: a comma-separated list, each measured in turn (with -fill: one count)")
	duration := flag.Duration("duration", 10*time.Second, "how long each row creates (with -fill: the window measured at each fill level)")
	fillFlag := flag.String("fill", "", "comma-separated VM counts (e.g. 1000,50000): fill the network through the API to each and measure creates/s there")
	docs := flag.String("docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of each API phase to FILE.<clients> (with -fill: of each window, to FILE.<count>); the raw etcd phases are not in it")
	memProfile := flag.String("memprofile", "", "write an allocation profile of the run to FILE, and of each API phase to FILE.<clients>.start and FILE.<clients> (go tool pprof -sample_index=alloc_space -diff_base FILE.<clients>.start FILE.<clients>: that phase alone)")
	flag.Parse()
	clients, err := benchdoc.Counts(*clientsFlag)
	if err != nil {
		log.Fatalf("-clients: %v", err)
	}
	fill, err := benchdoc.Counts(*fillFlag)
	if err != nil {
		log.Fatalf("-fill: %v", err)
	}
	ctx := context.Background()
	loadBefore := benchdoc.LoadAverage()
	b, err := start(ctx)
	if err != nil {
		log.Fatal(err)
	}
	b.memProfile = *memProfile
	if len(fill) > 0 {
		err = runFill(ctx, b, loadBefore, clients[len(clients)-1], fill, *duration, *docs, *cpuProfile)
	} else {
		err = run(ctx, b, loadBefore, clients, *duration, *docs, *cpuProfile)
	}
	b.stop()
	if err == nil {
		err = b.writeMemProfile()
	}
	if err != nil {
		log.Fatal(err)
	}
}

// bench is an embedded etcd and the API server over it.
type bench struct {
	cli    *clientv3.Client
	rawKV  clientv3.KV // etcd without the counting wrapper
	counts *etcdCounts
	vms    minicloudv1.VMServiceClient
	seq    atomic.Int64 // names and request ids of creates
	stop   func()

	// memProfile is where the run's allocation profile goes ("": none).
	memProfile string
}

// writeMemProfile writes the allocation profile of the whole run; the raw
// etcd phases are in it too, apart by function (main.(*bench).rawCreate
// and the etcd server under it).
func (b *bench) writeMemProfile() error {
	if b.memProfile == "" {
		return nil
	}
	return benchdoc.WriteAllocs(b.memProfile)
}

// phaseMemProfile writes the allocation profile so far to
// memProfile.<count><suffix>, if memProfile is set: one at the start and
// one at the end of a phase, whose difference is the phase's.
func (b *bench) phaseMemProfile(count int, suffix string) error {
	if b.memProfile == "" {
		return nil
	}
	return benchdoc.WriteAllocs(fmt.Sprintf("%s.%d%s", b.memProfile, count, suffix))
}

func start(ctx context.Context) (*bench, error) {
	cli, stopEtcd, err := benchdoc.EmbeddedEtcd(ctx, "apibench")
	if err != nil {
		return nil, err
	}
	b := &bench{cli: cli, rawKV: cli.KV, counts: &etcdCounts{}}
	cli.KV = &countingKV{KV: cli.KV, c: b.counts}
	cli.Lease = &countingLease{Lease: cli.Lease, c: b.counts}

	// As `minicloudd api` serves: TLS, and every call authenticated (the
	// bootstrap admin's token).
	// Quotas on, as minicloudd runs by default, with limits no run reaches:
	// every create is charged and checked in its transaction.
	big := int64(1) << 40
	srv, err := apiservertest.Listen(ctx, cli, apiserver.Config{DefaultQuota: &minicloudv1.QuotaLimits{
		Instances: &big, Vcpus: &big, MemoryMib: &big, DiskGib: &big, Networks: &big, ServerGroups: &big, ImageBytes: &big,
	}})
	if err != nil {
		stopEtcd()
		return nil, err
	}
	conn, err := grpc.NewClient(srv.Addr, srv.DialOptions(srv.AdminToken)...)
	if err != nil {
		srv.Server.Stop(ctx)
		stopEtcd()
		return nil, err
	}
	b.stop = func() { conn.Close(); srv.Server.Stop(ctx); stopEtcd() }
	if err := seed(ctx, cli, conn); err != nil {
		b.stop()
		return nil, err
	}
	b.vms = minicloudv1.NewVMServiceClient(conn)
	return b, nil
}

// create makes one VM through the API.
func (b *bench) create(ctx context.Context) error {
	n := b.seq.Add(1)
	_, err := b.vms.CreateVM(ctx, &minicloudv1.CreateVMRequest{
		Name:      fmt.Sprintf("bench-%d", n),
		RequestId: fmt.Sprintf("bench-%d", n),
		UserData:  []byte("#cloud-config\nhostname: bench\n"),
		Spec:      &minicloudv1.VMSpec{Image: "bench", Flavor: "bench"},
	})
	return err
}

// rawValue is the value of each of a raw transaction's puts: 7 × 292
// bytes ≈ 2 KB, about what a create writes (spec, status, user-data,
// name, request id, address, event; the usage key of the group commit
// is shared by a batch).
var rawValue = strings.Repeat("x", 292)

// rawCreate is one etcd transaction of a create's shape, without the API:
// one compare (the name key absent) and 7 puts of ~2 KB in all, on the
// same etcd and client connection as the API server's.
func (b *bench) rawCreate(ctx context.Context) error {
	n := b.seq.Add(1)
	prefix := fmt.Sprintf("/apibench-raw/%d/", n)
	ops := make([]clientv3.Op, 0, 7)
	for _, k := range []string{"name", "spec", "status", "userdata", "request", "address", "event"} {
		ops = append(ops, clientv3.OpPut(prefix+k, rawValue))
	}
	resp, err := b.rawKV.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(prefix+"name"), "=", 0)).Then(ops...).Commit()
	if err == nil && !resp.Succeeded {
		err = fmt.Errorf("raw txn %d: compare failed", n)
	}
	return err
}

// sample is what one timed phase measured.
type sample struct {
	latencies []time.Duration // sorted
	failed    int64
	elapsed   time.Duration
	cpu       time.Duration // CPU time of this process (API server, etcd and clients) during the phase
	mallocs   uint64        // heap allocations of this process during the phase
	bytes     uint64        // heap bytes allocated by this process during the phase
}

// allocsPerOp is the process's heap allocations (count and KB) per
// successful operation: what the garbage collector is fed, which on this
// shared machine moves even less with the other tenants' load than CPU.
func (s sample) allocsPerOp() string {
	n := uint64(len(s.latencies))
	return fmt.Sprintf("%d / %.1f KB", s.mallocs/n, float64(s.bytes)/float64(n)/1024)
}

// heapAllocs is the process's heap allocations so far (count, bytes).
func heapAllocs() (mallocs, bytes uint64) {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.Mallocs, m.TotalAlloc
}

// cpuPerOp is the process's CPU time per successful operation: on a
// shared machine it moves less with the other tenants' load than ops/s.
func (s sample) cpuPerOp() string {
	return round(s.cpu / time.Duration(len(s.latencies)))
}

func (s sample) rate() float64 { return float64(len(s.latencies)) / s.elapsed.Seconds() }

func (s sample) pct(p float64) time.Duration {
	return s.latencies[min(len(s.latencies)-1, int(float64(len(s.latencies))*p))]
}

// measure runs op from clients goroutines until duration has passed or
// limit operations have been started (0: no limit).
func measure(ctx context.Context, clients int, duration time.Duration, limit int64, op func(context.Context) error) (sample, error) {
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		s       sample
		failed  atomic.Int64
		started atomic.Int64
	)
	deadline := time.Now().Add(duration)
	mallocs, bytes := heapAllocs()
	began, cpu := time.Now(), benchdoc.ProcessCPU()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(deadline) && (limit == 0 || started.Add(1) <= limit) {
				t0 := time.Now()
				if err := op(ctx); err != nil {
					failed.Add(1)
					log.Printf("create: %v", err)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			s.latencies = append(s.latencies, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	s.elapsed, s.failed, s.cpu = time.Since(began), failed.Load(), benchdoc.ProcessCPU()-cpu
	endMallocs, endBytes := heapAllocs()
	s.mallocs, s.bytes = endMallocs-mallocs, endBytes-bytes
	if len(s.latencies) == 0 {
		return s, fmt.Errorf("no operation succeeded (%d failed)", s.failed)
	}
	slices.Sort(s.latencies)
	return s, nil
}

func run(ctx context.Context, b *bench, loadBefore string, clients []int, duration time.Duration, docs, cpuProfile string) error {
	var rows strings.Builder
	var vms int64
	for _, c := range clients {
		raw, err := measure(ctx, c, duration, 0, b.rawCreate)
		if err != nil {
			return fmt.Errorf("raw etcd, %d clients: %w", c, err)
		}
		startRev, err := revision(ctx, b.cli)
		if err != nil {
			return err
		}
		if err := b.phaseMemProfile(c, ".start"); err != nil {
			return err
		}
		b.counts.reset()
		stopProfile, err := profile(cpuProfile, c)
		if err != nil {
			return err
		}
		api, err := measure(ctx, c, duration, 0, b.create)
		stopProfile()
		if err != nil {
			return fmt.Errorf("api, %d clients: %w", c, err)
		}
		if err := b.phaseMemProfile(c, ""); err != nil {
			return err
		}
		snap := b.counts.snapshot()
		endRev, err := revision(ctx, b.cli)
		if err != nil {
			return err
		}
		n := len(api.latencies)
		per := func(v int64) string { return fmt.Sprintf("%.2f", float64(v)/float64(n)) }
		fmt.Fprintf(&rows, "| %d | raw etcd txn | — | %d | %d | %.0f | %s | %s | %s | %s | | | | |\n",
			c, len(raw.latencies), raw.failed, raw.rate(), round(raw.pct(0.50)), round(raw.pct(0.99)), raw.cpuPerOp(), raw.allocsPerOp())
		fmt.Fprintf(&rows, "| %d | API CreateVM | %d | %d | %d | %.0f | %s | %s | %s | %s | **%.2f×** | %s | %s | %s |\n",
			c, vms, n, api.failed, api.rate(), round(api.pct(0.50)), round(api.pct(0.99)), api.cpuPerOp(), api.allocsPerOp(), api.rate()/raw.rate(),
			per(endRev-startRev), per(snap.writeTxns), per(snap.requests))
		vms += int64(n)
		log.Printf("%d clients: raw %.0f/s, api %.0f/s (%d lost races, %d lease grants)", c, raw.rate(), api.rate(), snap.failedTxns, snap.leaseGrants)
	}
	loadAfter := benchdoc.LoadAverage()

	var out strings.Builder
	fmt.Fprintf(&out, "`go run ./hack/apibench -clients %s -duration %s` — embedded etcd (data in %s) and the API server in one process, concurrent gRPC clients over loopback, GOMAXPROCS=%d, load average %s before the run and %s after, measured %s.\n\n",
		joinInts(clients), duration, os.TempDir(), runtime.GOMAXPROCS(0), loadBefore, loadAfter, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&out, "| clients | what | VMs in the network before | ops | failed | ops/s | p50 | p99 | CPU / op | allocations / op | API / raw etcd (ops/s) | etcd revisions / create | etcd write txns / create | etcd requests / create |\n")
	fmt.Fprintf(&out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	out.WriteString(rows.String())
	fmt.Fprintf(&out, "\nEach client count runs two phases of %s, one after the other on the same embedded etcd: first raw etcd transactions of a create's shape (one compare that a key is absent, 7 puts of 292 bytes ≈ 2 KB; the client connection is the API server's, no API, no TLS to the API, no auth), then creates through the API. The API: as `minicloudd api` serves, TLS, and every call authenticated with the bootstrap admin's bearer token (checked against the API server's credentials cache, which an etcd watch keeps current: no etcd read per call) and authorized by the policy table; every create also writes its audit record (in the create's own transaction). Quotas on (a default quota no run reaches): every create is charged to its project's usage key in its transaction. All API creates go to one /16 network, so a later row starts with the VMs of the earlier ones. CPU / op is this process's CPU time (API server, etcd and the clients together) during the phase divided by its operations: on this shared machine it moves less with the other tenants' load than ops/s does; allocations / op likewise counts the whole process's heap allocations (runtime.MemStats: objects, and KB) per operation. Revisions count committed etcd writes, audit records included (group-committed, like the creates); a create is one transaction (spec, status, user-data, name index, request id, addresses, first event, audit record, the project's usage), and the creates of one project in flight at once are group-committed, up to 14 per transaction and two transactions in flight (they all compare and write the usage key), so fewer than 1.00 means several creates shared a commit. Write txns include transactions whose compares failed and were retried. Requests count every etcd call of the API, reads included.\n", duration)
	fmt.Print(out.String())
	if docs == "" {
		return nil
	}
	return benchdoc.RewriteSection(docs, "api", out.String())
}

// windowCap bounds the creates of one fill window, so that the window at
// the largest fill still fits in the /16.
const windowCap = 5000

// runFill fills the network through the API to each count of fill and
// measures creates/s there.
func runFill(ctx context.Context, b *bench, loadBefore string, clients int, fill []int, window time.Duration, docs, cpuProfile string) error {
	slices.Sort(fill)
	var rows strings.Builder
	var vms int64
	for _, target := range fill {
		t0 := time.Now()
		if missing := int64(target) - vms; missing > 0 {
			s, err := measure(ctx, clients, 24*time.Hour, missing, b.create)
			if err != nil {
				return fmt.Errorf("fill to %d: %w", target, err)
			}
			if s.failed > 0 {
				return fmt.Errorf("fill to %d: %d creates failed", target, s.failed)
			}
			vms += int64(len(s.latencies))
		}
		fillTime := time.Since(t0)
		load := benchdoc.LoadAverage()
		// The store's own speed where it is this full: raw transactions
		// of a create's shape on the same etcd, just before the API's
		// window, so the ratio is taken at the same fill.
		raw, err := measure(ctx, clients, window, 0, b.rawCreate)
		if err != nil {
			return fmt.Errorf("raw etcd window at %d: %w", target, err)
		}
		stopProfile, err := profile(cpuProfile, target)
		if err != nil {
			return err
		}
		s, err := measure(ctx, clients, window, windowCap, b.create)
		stopProfile()
		if err != nil {
			return fmt.Errorf("window at %d: %w", target, err)
		}
		fmt.Fprintf(&rows, "| %d | %s | %d | %d | %.0f | %s | %s | %s | %.0f | %s | **%.2f×** | %s |\n",
			vms, fillTime.Round(100*time.Millisecond), len(s.latencies), s.failed, s.rate(), round(s.pct(0.50)), round(s.pct(0.99)), s.cpuPerOp(),
			raw.rate(), raw.cpuPerOp(), s.rate()/raw.rate(), load)
		vms += int64(len(s.latencies))
		log.Printf("at %d VMs: %.0f creates/s, raw etcd %.0f txns/s (%.2fx)", target, s.rate(), raw.rate(), s.rate()/raw.rate())
	}
	loadAfter := benchdoc.LoadAverage()
	var out strings.Builder
	fmt.Fprintf(&out, "`go run ./hack/apibench -fill %s -clients %d -duration %s` — as the api table, with all creates in one /16 network (65,533 addresses for VMs), GOMAXPROCS=%d, load average %s before the run and %s after, measured %s.\n\n",
		joinInts(fill), clients, window, runtime.GOMAXPROCS(0), loadBefore, loadAfter, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&out, "| VMs in the network | time to fill to there | creates in the window | failed | creates/s | p50 | p99 | CPU / create | raw etcd txns/s | CPU / raw txn | API / raw etcd | load average at the window |\n")
	fmt.Fprintf(&out, "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	out.WriteString(rows.String())
	fmt.Fprintf(&out, "\nThe harness creates VMs through the API with %d clients until the network holds the row's count, then measures %s of raw etcd transactions of a create's shape (as in the api table; their keys stay, outside the network) and then creates for %s (at most %d creates, so the largest fill still fits the /16): the ratio is the API's to its store's at the same fill.\n", clients, window, window, windowCap)
	fmt.Print(out.String())
	if docs == "" {
		return nil
	}
	return benchdoc.RewriteSection(docs, "api-fill", out.String())
}

// profile starts a CPU profile to path.<count> (clients, or VMs with
// -fill), if path is set; the
// returned function stops it.
func profile(path string, count int) (func(), error) {
	if path == "" {
		return benchdoc.CPUProfile("")
	}
	return benchdoc.CPUProfile(fmt.Sprintf("%s.%d", path, count))
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

func round(d time.Duration) string {
	if d < 10*time.Millisecond {
		return d.Round(10 * time.Microsecond).String()
	}
	return d.Round(100 * time.Microsecond).String()
}

func revision(ctx context.Context, cli *clientv3.Client) (int64, error) {
	resp, err := cli.Get(ctx, "revision", clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// seed creates what a create refers to: a flavor and a /16 network through
// the API, and image metadata straight in etcd (uploads are benchmarked
// with the image service, not here).
func seed(ctx context.Context, cli *clientv3.Client, conn *grpc.ClientConn) error {
	if _, err := minicloudv1.NewFlavorServiceClient(conn).CreateFlavor(ctx, &minicloudv1.CreateFlavorRequest{Name: "bench", Vcpus: 1, MemoryMib: 256, DiskGib: 1}); err != nil {
		return err
	}
	if _, err := minicloudv1.NewNetworkServiceClient(conn).CreateNetwork(ctx, &minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.200.0.0/16"}); err != nil {
		return err
	}
	img, err := store.Marshal(&minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Id: "bench", Name: "bench"}, Format: minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2})
	if err != nil {
		return err
	}
	_, err = cli.Put(ctx, store.ImageKey("bench"), img)
	return err
}
