// Command apibench measures the API's VM create path: an embedded etcd and
// the API server in this process, N concurrent gRPC clients creating VMs
// for a fixed time. It reports create latency (p50/p99), creates/s and the
// etcd work per create, and rewrites the "api" section of
// docs/benchmarks.md.
//
//	go run ./hack/apibench [-clients 16] [-duration 10s] [-docs docs/benchmarks.md]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
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
	clients := flag.Int("clients", 16, "concurrent clients")
	duration := flag.Duration("duration", 10*time.Second, "how long to create VMs")
	docs := flag.String("docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the run to this file")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			log.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			log.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	if err := run(*clients, *duration, *docs); err != nil {
		pprof.StopCPUProfile()
		log.Fatal(err)
	}
}

func run(clients int, duration time.Duration, docs string) error {
	ctx := context.Background()
	load := benchdoc.LoadAverage()
	cli, stop, err := benchdoc.EmbeddedEtcd(ctx, "apibench")
	if err != nil {
		return err
	}
	defer stop()
	counts := &etcdCounts{}
	cli.KV = &countingKV{KV: cli.KV, c: counts}
	cli.Lease = &countingLease{Lease: cli.Lease, c: counts}

	// As `minicloudd api` serves: TLS, and every call authenticated (the
	// bootstrap admin's token).
	// Quotas on, as minicloudd runs by default, with limits no run reaches:
	// every create is charged and checked in its transaction.
	big := int64(1) << 40
	srv, err := apiservertest.Listen(ctx, cli, apiserver.Config{DefaultQuota: &minicloudv1.QuotaLimits{
		Instances: &big, Vcpus: &big, MemoryMib: &big, DiskGib: &big, Networks: &big, ServerGroups: &big, ImageBytes: &big,
	}})
	if err != nil {
		return err
	}
	defer srv.Server.Stop(ctx)
	conn, err := grpc.NewClient(srv.Addr, srv.DialOptions(srv.AdminToken)...)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := seed(ctx, cli, conn); err != nil {
		return err
	}

	vms := minicloudv1.NewVMServiceClient(conn)
	startRev, err := revision(ctx, cli)
	if err != nil {
		return err
	}
	counts.reset()
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		latencies []time.Duration
		failed    atomic.Int64
		seq       atomic.Int64
	)
	deadline := time.Now().Add(duration)
	began := time.Now()
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(deadline) {
				n := seq.Add(1)
				t0 := time.Now()
				_, err := vms.CreateVM(ctx, &minicloudv1.CreateVMRequest{
					Name:      fmt.Sprintf("bench-%d-%d", c, n),
					RequestId: fmt.Sprintf("bench-%d", n),
					UserData:  []byte("#cloud-config\nhostname: bench\n"),
					Spec:      &minicloudv1.VMSpec{Image: "bench", Flavor: "bench"},
				})
				if err != nil {
					failed.Add(1)
					log.Printf("create: %v", err)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(began)
	snap := counts.snapshot()
	endRev, err := revision(ctx, cli)
	if err != nil {
		return err
	}
	n := len(latencies)
	if n == 0 {
		return fmt.Errorf("no create succeeded (%d failed)", failed.Load())
	}
	slices.Sort(latencies)
	pct := func(p float64) time.Duration { return latencies[min(n-1, int(float64(n)*p))] }
	per := func(v int64) string { return fmt.Sprintf("%.2f", float64(v)/float64(n)) }
	var b strings.Builder
	fmt.Fprintf(&b, "`go run ./hack/apibench -clients %d -duration %s` — embedded etcd (data in %s) and the API server in one process, %d concurrent gRPC clients over loopback, GOMAXPROCS=%d, load average before the run %s, measured %s.\n\n",
		clients, duration, os.TempDir(), clients, runtime.GOMAXPROCS(0), load, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "| clients | creates | failed | creates/s | create p50 | create p99 | etcd revisions / create | etcd write txns / create | etcd requests / create |\n")
	fmt.Fprintf(&b, "|---|---|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| %d | %d | %d | %.0f | %s | %s | %s | %s | %s |\n\n",
		clients, n, failed.Load(), float64(n)/elapsed.Seconds(), round(pct(0.50)), round(pct(0.99)),
		per(endRev-startRev), per(snap.writeTxns), per(snap.requests))
	fmt.Fprintf(&b, "As `minicloudd api` serves: TLS, and every call authenticated with the bootstrap admin's bearer token (one etcd read per call for the token and its user) and authorized by the policy table; every create also writes its audit record (one put, outside the create's transaction). Quotas on (a default quota no run reaches): every create is charged to its project's usage key in its transaction. Revisions count committed etcd writes, audit records included; a create is one transaction (spec, status, user-data, name index, request id, addresses, first event, the project's usage), and the creates of one project in flight at once are group-committed into one transaction (they all compare and write the usage key), so fewer than 1.00 means several creates shared a commit. Write txns include transactions whose compares failed and were retried (%d lost races in total, %d lease grants for request ids). Requests count every etcd call of the API, reads included.\n",
		snap.failedTxns, snap.leaseGrants)
	fmt.Print(b.String())
	if docs == "" {
		return nil
	}
	return benchdoc.RewriteSection(docs, "api", b.String())
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
