// Command imagebench measures cold image delivery (issue 15, section 5):
// the first VM on a host whose cache lacks a 1 GiB image. In one process it
// starts an embedded etcd and two real API servers sharing one image store
// (TLS, as `minicloudd api` serves): every round uploads a new random
// (incompressible) raw image through one (A, stopped once the upload
// returned, as if on another machine) and the host fetches from the other
// (B). On the same filesystem and in the same run it measures:
//
//   - `cp` of the API's stored blob followed by `sync` of the copy: the
//     physical limit of a durable copy on this disk, the baseline the
//     target is judged against (the cache fsyncs its file before it uses
//     it), and `cp` alone, which only fills the page cache;
//   - a cold fetch by the agent's image cache (agent/imagecache) over
//     gRPC with the host's mTLS certificate: download, sha256 verify,
//     fsync and rename into place, twice: the first serve of the blob,
//     begun as soon as the upload returned (the image's first VM), which
//     B verifies while serving (every replica checks a new blob in the
//     background, but only once it is 2 s old: imageservice.VerifiedGuard),
//     and a later one, after B's background check, which B does not
//     verify again (every host after the first, and a first fetch more
//     than ~3 s after the upload);
//   - N concurrent fetches of the same image into another empty cache,
//     counting the DownloadImage calls the API served (its
//     minicloud_api_requests_total metric): single-flight means one.
//
// It rewrites the "image" section of docs/benchmarks.md.
//
// The upload, the copy and the two fetches are repeated in rounds,
// and each ratio is the median of the rounds' own ratios, so a load that
// drifts during the run weighs on the baseline as much as on the fetch.
//
//	go run ./hack/imagebench [-size 1GiB-in-bytes] [-rounds 3] [-concurrent 8] [-docs docs/benchmarks.md] [-cpuprofile FILE] [-memprofile FILE]
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/minicloud/minicloud/agent/imagecache"
	"github.com/minicloud/minicloud/agent/qemuaccess"
	"github.com/minicloud/minicloud/api/imageservice"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/hack/benchdoc"
	"github.com/minicloud/minicloud/pkg/sysmon"
)

const imageName = "imagebench"

func main() {
	// Both ends run as minicloudd runs them: with the runtime's monitor
	// thread kept from parking (pkg/sysmon), which minicloudd sets for
	// itself at start (docs/benchmarks.md, "Cold image delivery", says
	// what the default costs the fetch).
	if err := sysmon.Reexec(); err != nil {
		log.Print(err)
	}
	size := flag.Int64("size", 1<<30, "image size in bytes")
	concurrent := flag.Int("concurrent", 8, "concurrent fetches of the same uncached image")
	rounds := flag.Int("rounds", 3, "rounds of copy, first serve and later serve")
	docs := flag.String("docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the cold fetch of a blob verified before to this file")
	firstProfile := flag.String("firstcpuprofile", "", "write a CPU profile of the last round's first serve to this file")
	memProfile := flag.String("memprofile", "", "write allocation profiles from before and after the cold fetch of a blob verified before to FILE.start and FILE (go tool pprof -sample_index=alloc_space -diff_base FILE.start FILE: that fetch alone)")
	flag.Parse()
	if *size <= 0 || *size%512 != 0 || *concurrent < 1 || *rounds < 1 {
		log.Fatal("-size must be a positive multiple of 512, -concurrent and -rounds at least 1")
	}
	if err := run(context.Background(), *size, *rounds, *concurrent, *docs, profiles{cpu: *cpuProfile, mem: *memProfile, first: *firstProfile}); err != nil {
		log.Fatal(err)
	}
}

// result is what one run measured.
type result struct {
	size                      int64
	rounds                    []round
	concurrent                int
	all                       time.Duration // N concurrent fetches, until the last returned
	downloadsCold, downloadsN int64         // DownloadImage calls for all rounds' fetches, for the concurrent ones
}

// round is one copy and two cold fetches of the same blob.
type round struct {
	cp, cpSync      time.Duration
	first, firstCPU time.Duration // the API verifies the blob
	cold, coldCPU   time.Duration // the API verified it before
}

// profiles are where the profiles of the last round's later serve (cpu,
// mem) and first serve (first) go ("" for none).
type profiles struct{ cpu, mem, first string }

func run(ctx context.Context, size int64, rounds, n int, docs string, prof profiles) error {
	loadBefore, began := benchdoc.LoadAverages(), time.Now()
	// Everything on one filesystem: the API's image store, the copy, and
	// the caches.
	dir, err := os.MkdirTemp("/var/tmp", "imagebench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	cli, stopEtcd, err := benchdoc.EmbeddedEtcd(ctx, "imagebench")
	if err != nil {
		return err
	}
	defer stopEtcd()
	big := int64(1) << 50
	// Every replica of the run: one etcd, one image store.
	replica := func() (*apiservertest.Running, error) {
		return apiservertest.Listen(ctx, cli, apiserver.Config{
			ImageDir:      filepath.Join(dir, "store"),
			MaxImageBytes: 2 * size,
			DefaultQuota:  &minicloudv1.QuotaLimits{ImageBytes: &big},
		})
	}
	// B serves the host.
	srv, err := replica()
	if err != nil {
		return err
	}
	defer srv.Server.Stop(ctx)
	admin, err := grpc.NewClient(srv.Addr, srv.DialOptions(srv.AdminToken)...)
	if err != nil {
		return err
	}
	defer admin.Close()
	// The agent's connection: the host's mTLS certificate, as minicloudd
	// agent dials.
	hostOpts, err := srv.HostDialOptions("imagebench-host")
	if err != nil {
		return err
	}
	host, err := grpc.NewClient(srv.Addr, append(hostOpts, imagecache.DialOptions()...)...)
	if err != nil {
		return err
	}
	defer host.Close()
	images := minicloudv1.NewImageServiceClient(host)

	r := result{size: size, concurrent: n}
	before, err := downloads(srv.Server)
	if err != nil {
		return err
	}
	var name, digest string
	for i := range rounds {
		if name != "" {
			// One GiB at a time in the store.
			if _, err := minicloudv1.NewImageServiceClient(admin).DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: name}); err != nil {
				return err
			}
		}
		name = fmt.Sprintf("%s-%d", imageName, i+1)
		log.Printf("uploading a %d MiB random image through another replica", size>>20)
		img, stopped, err := uploadThroughAnother(ctx, replica, name, size)
		if err != nil {
			return err
		}
		digest = img.GetDisk().GetSha256()
		var profile profiles
		if i == rounds-1 {
			profile = prof
		}
		rd, err := measureRound(ctx, dir, srv.Server, images, name, digest, size, profile)
		<-stopped
		if err != nil {
			return fmt.Errorf("round %d: %w", i+1, err)
		}
		r.rounds = append(r.rounds, rd)
	}
	after, err := downloads(srv.Server)
	if err != nil {
		return err
	}
	r.downloadsCold = after - before

	// (c) n concurrent fetches of the same uncached image on one host.
	before = after
	var wg sync.WaitGroup
	cache, err := imagecache.New(filepath.Join(dir, "cache-concurrent"), images, qemuaccess.Access{})
	if err != nil {
		return err
	}
	errs := make([]error, n)
	t0 := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = cache.Ensure(ctx, name, minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
		}()
	}
	wg.Wait()
	r.all = time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("concurrent fetches: %w", err)
	}
	if after, err = downloads(srv.Server); err != nil {
		return err
	}
	r.downloadsN = after - before
	log.Printf("%d concurrent fetches %s (%d download(s))", n, r.all, r.downloadsN)

	out := render(r, loadBefore, benchdoc.LoadAverages(), time.Since(began))
	fmt.Print(out)
	if docs == "" {
		return nil
	}
	return benchdoc.RewriteSection(docs, "image", out)
}

// uploadThroughAnother uploads the image name through a replica of its
// own, which it stops once the upload has returned: the background check
// of the new blob by the replica that took the upload runs on that
// replica's machine in a cluster, not on the cores of the fetch. The stop
// goes on beside the caller's fetch (it takes ~0.5 s and would delay it);
// stopped is closed when it is done, well before the check would begin.
func uploadThroughAnother(ctx context.Context, replica func() (*apiservertest.Running, error), name string, size int64) (img *minicloudv1.Image, stopped <-chan struct{}, err error) {
	a, err := replica()
	if err != nil {
		return nil, nil, err
	}
	done := make(chan struct{})
	defer func() {
		go func(t0 time.Time) {
			defer close(done)
			// Nothing of A's is needed once the upload returned: not
			// its graceful stop.
			sctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
			defer cancel()
			a.Server.Stop(sctx)
			log.Printf("the replica that took the upload stopped in %s", time.Since(t0).Round(time.Millisecond))
		}(time.Now())
	}()
	conn, err := grpc.NewClient(a.Addr, a.DialOptions(a.AdminToken)...)
	if err != nil {
		return nil, done, err
	}
	defer conn.Close()
	img, err = upload(ctx, minicloudv1.NewImageServiceClient(conn), name, size)
	return img, done, err
}

// measureRound times (a) a cold fetch of the image just uploaded, begun
// at once (the API hashes the blob while serving it), (b) once srv's
// background check of the blob is done, `cp` of the blob to a new file
// beside it and `cp` + `sync` of the copy, and (c) a later cold fetch (the
// API does not hash the blob).
func measureRound(ctx context.Context, dir string, srv *apiserver.Server, images minicloudv1.ImageServiceClient, name, digest string, size int64, profile profiles) (round, error) {
	var rd round
	var err error
	if rd.first, rd.firstCPU, err = coldFetch(ctx, filepath.Join(dir, "cache-first"), images, name, digest, profiles{cpu: profile.first}); err != nil {
		return rd, err
	}
	// The check shares the cores with whatever runs: not with the copy.
	if err := waitChecks(ctx, srv); err != nil {
		return rd, err
	}
	blob, err := findBlob(filepath.Join(dir, "store"), size)
	if err != nil {
		return rd, err
	}
	// The upload (and the first serve) just read or wrote the blob, so
	// its pages are as warm for cp as for the download.
	dst := filepath.Join(dir, "copy")
	t0 := time.Now()
	if out, err := exec.Command("cp", blob, dst).CombinedOutput(); err != nil {
		return rd, fmt.Errorf("cp: %v: %s", err, out)
	}
	rd.cp = time.Since(t0)
	if out, err := exec.Command("sync", dst).CombinedOutput(); err != nil {
		return rd, fmt.Errorf("sync: %v: %s", err, out)
	}
	rd.cpSync = time.Since(t0)
	if err := os.Remove(dst); err != nil {
		return rd, err
	}
	log.Printf("cp %s, cp+sync %s", rd.cp, rd.cpSync)
	if rd.cold, rd.coldCPU, err = coldFetch(ctx, filepath.Join(dir, "cache-cold"), images, name, digest, profiles{cpu: profile.cpu, mem: profile.mem}); err != nil {
		return rd, err
	}
	log.Printf("cold fetch: first serve %s, blob verified before %s", rd.first, rd.cold)
	return rd, nil
}

// waitChecks waits until srv has no background check of a blob queued or
// running (its minicloud_image_checks_pending metric).
func waitChecks(ctx context.Context, srv *apiserver.Server) error {
	for {
		n, err := metric(srv, "minicloud_image_checks_pending", "")
		if err != nil || n == 0 {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// coldFetch is one Ensure of the image into a new, empty cache in dir,
// timed, with the process's CPU (API server, etcd and cache together) and
// the profiles asked for. The cache is removed.
func coldFetch(ctx context.Context, dir string, images minicloudv1.ImageServiceClient, name, digest string, profile profiles) (took, cpu time.Duration, err error) {
	cache, err := imagecache.New(dir, images, qemuaccess.Access{})
	if err != nil {
		return 0, 0, err
	}
	if profile.mem != "" {
		if err := benchdoc.WriteAllocs(profile.mem + ".start"); err != nil {
			return 0, 0, err
		}
	}
	stopProfile, err := benchdoc.CPUProfile(profile.cpu)
	if err != nil {
		return 0, 0, err
	}
	t0, cpu0 := time.Now(), benchdoc.ProcessCPU()
	_, err = cache.Ensure(ctx, name, minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
	took, cpu = time.Since(t0), benchdoc.ProcessCPU()-cpu0
	stopProfile()
	if err != nil {
		return 0, 0, fmt.Errorf("cold fetch: %w", err)
	}
	if profile.mem != "" {
		if err := benchdoc.WriteAllocs(profile.mem); err != nil {
			return 0, 0, err
		}
	}
	return took, cpu, os.RemoveAll(cache.Dir())
}

// upload creates the image name from size random bytes, streamed as
// `minicloud image create` sends a file.
func upload(ctx context.Context, c minicloudv1.ImageServiceClient, name string, size int64) (*minicloudv1.Image, error) {
	stream, err := c.CreateImage(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{
		Name: name, DiskSizeBytes: size, Format: minicloudv1.ImageFormat_IMAGE_FORMAT_RAW,
	}}}); err != nil {
		return nil, err
	}
	buf := make([]byte, 256<<10)
	for left := size; left > 0; {
		chunk := buf[:min(int64(len(buf)), left)]
		if _, err := rand.Read(chunk); err != nil {
			return nil, err
		}
		if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: chunk}}}); err != nil {
			break // the server's reason comes with CloseAndRecv
		}
		left -= int64(len(chunk))
	}
	img, err := stream.CloseAndRecv()
	if err != nil {
		return nil, fmt.Errorf("upload: %w", err)
	}
	return img, nil
}

// findBlob is the one file of the given size in the API's image store:
// the blob DownloadImage reads.
func findBlob(store string, size int64) (string, error) {
	var found []string
	err := filepath.WalkDir(store, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		if info, err := d.Info(); err == nil && info.Size() == size {
			found = append(found, path)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if len(found) != 1 {
		return "", fmt.Errorf("image store %s: %d files of %d bytes, want 1", store, len(found), size)
	}
	return found[0], nil
}

// downloads is the number of DownloadImage calls the API has served, from
// its own /metrics.
func downloads(s *apiserver.Server) (int64, error) {
	v, err := metric(s, "minicloud_api_requests_total", `method="/minicloud.v1.ImageService/DownloadImage"`)
	return int64(v), err
}

// metric is the sum of the series of the metric family that s serves on
// /metrics and whose labels contain label ("" for all).
func metric(s *apiserver.Server, family, label string) (float64, error) {
	rec := httptest.NewRecorder()
	s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	var total float64
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(line, "#") || (f[0] != family && !strings.HasPrefix(f[0], family+"{")) || !strings.Contains(line, label) {
			continue
		}
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metrics line %q: %w", line, err)
		}
		total += v
	}
	return total, sc.Err()
}

// medianOf is the median of f over the rounds (the mean of the middle two
// for an even count).
func medianOf(rounds []round, f func(round) float64) float64 {
	v := make([]float64, len(rounds))
	for i, rd := range rounds {
		v[i] = f(rd)
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func mbps(size int64, d time.Duration) float64 { return float64(size) / 1e6 / d.Seconds() }

func render(r result, loadBefore, loadAfter string, took time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "`go run ./hack/imagebench -size %d -rounds %d -concurrent %d` (as root) — embedded etcd and real API servers in one process (TLS; one image store in /var/tmp shared by the replicas), the agent's image cache (agent/imagecache) fetching over gRPC with a host mTLS certificate, a %d MiB random (incompressible) raw image; the store, the copy and the caches on one filesystem; the process runs with the GODEBUG setting minicloudd re-executes itself with (pkg/sysmon: the runtime's monitor thread does not park when the process idles). GOMAXPROCS=%d, 2 cores shared with other work; load average %s before the run, %s after; the run took %s; measured %s.\n\n",
		r.size, len(r.rounds), r.concurrent, r.size>>20, runtime.GOMAXPROCS(0), loadBefore, loadAfter, took.Round(time.Second), time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	// The baseline is the durable copy: the cache fsyncs its file before
	// it hands it to QEMU, so a copy that has not reached the disk is not
	// the same work. The page-cache cp is shown beside it. Times are the
	// medians of the rounds, ratios the medians of each round's own ratio.
	durable := func(of func(round) time.Duration) float64 {
		return medianOf(r.rounds, func(rd round) float64 { return rd.cpSync.Seconds() / of(rd).Seconds() })
	}
	pageCache := func(of func(round) time.Duration) float64 {
		return medianOf(r.rounds, func(rd round) float64 { return rd.cp.Seconds() / of(rd).Seconds() })
	}
	med := func(of func(round) time.Duration) time.Duration {
		return time.Duration(medianOf(r.rounds, func(rd round) float64 { return float64(of(rd)) }))
	}
	cp := func(rd round) time.Duration { return rd.cp }
	cpSync := func(rd round) time.Duration { return rd.cpSync }
	first := func(rd round) time.Duration { return rd.first }
	cold := func(rd round) time.Duration { return rd.cold }
	fmt.Fprintf(&b, "| what (median of %d rounds) | time | MB/s | vs `cp` + `sync` (durable: the baseline) | vs `cp` (page cache only) | DownloadImage calls served |\n|---|---:|---:|---:|---:|---:|\n", len(r.rounds))
	fmt.Fprintf(&b, "| `cp` + `sync` of the API's blob | %s | %.0f | 1.00× | %.2f× | |\n", med(cpSync).Round(time.Millisecond), mbps(r.size, med(cpSync)), pageCache(cpSync))
	fmt.Fprintf(&b, "| `cp` of the API's blob (page cache warm; not on the disk when it returns) | %s | %.0f | %.2f× | 1.00× | |\n", med(cp).Round(time.Millisecond), mbps(r.size, med(cp)), durable(cp))
	fmt.Fprintf(&b, "| cold fetch, first serve: begun as soon as the upload through another replica returned (the image's first VM; the API hashes the blob while serving it; CPU %s) | %s | %.0f | **%.2f×** | %.2f× | |\n", med(func(rd round) time.Duration { return rd.firstCPU }).Round(time.Millisecond), med(first).Round(time.Millisecond), mbps(r.size, med(first)), durable(first), pageCache(first))
	fmt.Fprintf(&b, "| cold fetch after the replica's background check of the new blob (every further host, and a first fetch begun ~3 s or more after the upload; CPU %s) | %s | %.0f | **%.2f×** | %.2f× | %d for all %d |\n", med(func(rd round) time.Duration { return rd.coldCPU }).Round(time.Millisecond), med(cold).Round(time.Millisecond), mbps(r.size, med(cold)), durable(cold), pageCache(cold), r.downloadsCold, 2*len(r.rounds))
	// The concurrent fetches run once, after the rounds: against the
	// median baseline.
	fmt.Fprintf(&b, "| %d concurrent fetches of the uncached image, until the last returns | %s | %.0f | %.2f× | %.2f× | **%d** |\n", r.concurrent, r.all.Round(time.Millisecond), mbps(r.size, r.all), med(cpSync).Seconds()/r.all.Seconds(), med(cp).Seconds()/r.all.Seconds(), r.downloadsN)
	var perRound []string
	for _, rd := range r.rounds {
		perRound = append(perRound, fmt.Sprintf("`cp` + `sync` %s, first serve %.2f×, later serve %.2f×", rd.cpSync.Round(time.Millisecond), rd.cpSync.Seconds()/rd.first.Seconds(), rd.cpSync.Seconds()/rd.cold.Seconds()))
	}
	fmt.Fprintf(&b, "\nRounds, against their own durable copy: %s.\n", strings.Join(perRound, "; "))
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**NOT met**"
	}
	fmt.Fprintf(&b, "\nTargets: cold fetch ≥ 0.5× the durable copy (`cp` + `sync`) — first serve %.2f×, %s; blob verified before %.2f×, %s (against the page-cache `cp`: %.2f× and %.2f×); %d concurrent fetches of one uncached image download it once — %d download(s), %s.\n",
		durable(first), verdict(durable(first) >= 0.5), durable(cold), verdict(durable(cold) >= 0.5), pageCache(first), pageCache(cold), r.concurrent, r.downloadsN, verdict(r.downloadsN == 1))
	fmt.Fprintf(&b, "\nHow it runs: every round uploads a new image through CreateImage on a replica of its own (A), stopped as soon as the upload returned (in a cluster A checks the new blob on its own machine, not on the fetch's cores), and the host fetches from replica B, which did not take the upload: the blob was just written and its pages are warm in the page cache for both `cp` and the downloads (caches cannot be dropped on this shared machine); the copy and each cache's file are written cold. Each round times a cold fetch begun at once, one `Ensure` into an empty cache: B has not verified the blob (every replica checks the blobs of a new image in the background, one at a time, but only once they are %s old, and remembers them by inode, size and timestamps), so it hashes the blob while serving it, as for the first VM of a new image; then, once B's background check is done (its minicloud_image_checks_pending metric at 0), `cp` of the blob to a new file beside it, timed alone and until `sync` of the copy returned (the cache fsyncs its file and directory before the rename, so `cp` + `sync` is the like-for-like write and the baseline); then a second cold fetch, served without the API's hash, as every host after the first is, and a first host that asks ~3 s or more after the upload; the agent's cache verifies both. DownloadImage streams 1 MiB messages over TLS on loopback, each read from the blob into a pooled buffer that the API's codec hands to gRPC without a copy; the agent's connection has imagecache.DialOptions (no bufio read buffer, frame buffers not zeroed), and the cache's own codec copies each message's data from gRPC's receive buffers into 4 MiB aligned buffers that one goroutine hashes while another writes them to a temporary file with O_DIRECT (past the page cache) through Linux AIO (the write waits in the netpoller, not in a system call holding one of the two Ps), then fsyncs and renames it into place. The concurrent row is %d `Ensure` calls at once of the last round's image into another empty cache on one host; DownloadImage calls are counted from B's own `minicloud_api_requests_total` metric. CPU is this process's (API server, etcd and the cache together) during the fetch.\n", imageservice.VerifiedGuard, r.concurrent)
	return b.String()
}
