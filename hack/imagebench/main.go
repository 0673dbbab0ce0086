// Command imagebench measures cold image delivery (issue 15, section 5):
// the first VM on a host whose cache lacks a 1 GiB image. In one process it
// starts an embedded etcd and the real API server (TLS, as `minicloudd api`
// serves, with its image store), uploads a random (incompressible) raw
// image, and then, on the same filesystem and in the same run, measures:
//
//   - `cp` of the API's stored blob (the physical limit of the disk), and
//     `cp` followed by `sync` of the copy (the cache fsyncs too);
//   - a cold fetch by the agent's image cache (agent/imagecache) over
//     gRPC with the host's mTLS certificate: download, sha256 verify,
//     fsync and rename into place;
//   - N concurrent fetches of the same image into another empty cache,
//     counting the DownloadImage calls the API served (its
//     minicloud_api_requests_total metric): single-flight means one.
//
// It rewrites the "image" section of docs/benchmarks.md.
//
//	go run ./hack/imagebench [-size 1GiB-in-bytes] [-concurrent 8] [-docs docs/benchmarks.md] [-cpuprofile FILE]
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
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/minicloud/minicloud/agent/imagecache"
	"github.com/minicloud/minicloud/agent/qemuaccess"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/hack/benchdoc"
)

const imageName = "imagebench"

func main() {
	size := flag.Int64("size", 1<<30, "image size in bytes")
	concurrent := flag.Int("concurrent", 8, "concurrent fetches of the same uncached image")
	docs := flag.String("docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the cold fetch to this file")
	flag.Parse()
	if *size <= 0 || *size%512 != 0 || *concurrent < 1 {
		log.Fatal("-size must be a positive multiple of 512 and -concurrent at least 1")
	}
	if err := run(context.Background(), *size, *concurrent, *docs, *cpuProfile); err != nil {
		log.Fatal(err)
	}
}

// result is what one run measured.
type result struct {
	size                      int64
	cp, cpSync                time.Duration
	cold, coldCPU             time.Duration
	concurrent                int
	all                       time.Duration // N concurrent fetches, until the last returned
	downloadsCold, downloadsN int64
}

func run(ctx context.Context, size int64, n int, docs, cpuProfile string) error {
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
	srv, err := apiservertest.Listen(ctx, cli, apiserver.Config{
		ImageDir:      filepath.Join(dir, "store"),
		MaxImageBytes: 2 * size,
		DefaultQuota:  &minicloudv1.QuotaLimits{ImageBytes: &big},
	})
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
	host, err := grpc.NewClient(srv.Addr, hostOpts...)
	if err != nil {
		return err
	}
	defer host.Close()
	images := minicloudv1.NewImageServiceClient(host)

	log.Printf("uploading a %d MiB random image", size>>20)
	img, err := upload(ctx, minicloudv1.NewImageServiceClient(admin), size)
	if err != nil {
		return err
	}
	digest := img.GetDisk().GetSha256()
	blob, err := findBlob(filepath.Join(dir, "store"), size)
	if err != nil {
		return err
	}
	r := result{size: size, concurrent: n}

	// (a) cp of the same blob on the same filesystem. The upload just
	// wrote it, so its pages are as warm for cp as for the download.
	dst := filepath.Join(dir, "copy")
	t0 := time.Now()
	if out, err := exec.Command("cp", blob, dst).CombinedOutput(); err != nil {
		return fmt.Errorf("cp: %v: %s", err, out)
	}
	r.cp = time.Since(t0)
	if out, err := exec.Command("sync", dst).CombinedOutput(); err != nil {
		return fmt.Errorf("sync: %v: %s", err, out)
	}
	r.cpSync = time.Since(t0)
	if err := os.Remove(dst); err != nil {
		return err
	}
	log.Printf("cp %s, cp+sync %s", r.cp, r.cpSync)

	// (b) a cold fetch into an empty cache.
	before, err := downloads(srv.Server)
	if err != nil {
		return err
	}
	cache, err := imagecache.New(filepath.Join(dir, "cache-cold"), images, qemuaccess.Access{})
	if err != nil {
		return err
	}
	stopProfile, err := benchdoc.CPUProfile(cpuProfile)
	if err != nil {
		return err
	}
	t0, cpu0 := time.Now(), benchdoc.ProcessCPU()
	if _, err := cache.Ensure(ctx, imageName, minicloudv1.ImagePart_IMAGE_PART_DISK, digest); err != nil {
		stopProfile()
		return fmt.Errorf("cold fetch: %w", err)
	}
	r.cold, r.coldCPU = time.Since(t0), benchdoc.ProcessCPU()-cpu0
	stopProfile()
	after, err := downloads(srv.Server)
	if err != nil {
		return err
	}
	r.downloadsCold = after - before
	if err := os.RemoveAll(cache.Dir()); err != nil {
		return err
	}
	log.Printf("cold fetch %s (%d download(s))", r.cold, r.downloadsCold)

	// (c) n concurrent fetches of the same uncached image on one host.
	cache, err = imagecache.New(filepath.Join(dir, "cache-concurrent"), images, qemuaccess.Access{})
	if err != nil {
		return err
	}
	before = after
	var wg sync.WaitGroup
	errs := make([]error, n)
	t0 = time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = cache.Ensure(ctx, imageName, minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
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

// upload creates the image from size random bytes, streamed as `minicloud
// image create` sends a file.
func upload(ctx context.Context, c minicloudv1.ImageServiceClient, size int64) (*minicloudv1.Image, error) {
	stream, err := c.CreateImage(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{
		Name: imageName, DiskSizeBytes: size, Format: minicloudv1.ImageFormat_IMAGE_FORMAT_RAW,
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
	rec := httptest.NewRecorder()
	s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	var total int64
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "minicloud_api_requests_total{") || !strings.Contains(line, `method="/minicloud.v1.ImageService/DownloadImage"`) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metrics line %q: %w", line, err)
		}
		total += int64(v)
	}
	return total, sc.Err()
}

func mbps(size int64, d time.Duration) float64 { return float64(size) / 1e6 / d.Seconds() }

func render(r result, loadBefore, loadAfter string, took time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "`nice -n 10 go run ./hack/imagebench -size %d -concurrent %d` (as root) — embedded etcd and the real API server in one process (TLS; its image store in /var/tmp), the agent's image cache (agent/imagecache) fetching over gRPC with a host mTLS certificate, a %d MiB random (incompressible) raw image; the store, the copy and the caches on one filesystem. GOMAXPROCS=%d, 2 cores shared with other work; load average %s before the run, %s after; the run took %s; measured %s.\n\n",
		r.size, r.concurrent, r.size>>20, runtime.GOMAXPROCS(0), loadBefore, loadAfter, took.Round(time.Second), time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "| what | time | MB/s | vs `cp` | DownloadImage calls served |\n|---|---:|---:|---:|---:|\n")
	fmt.Fprintf(&b, "| `cp` of the API's blob (page cache warm) | %s | %.0f | 1.00× | |\n", r.cp.Round(time.Millisecond), mbps(r.size, r.cp))
	fmt.Fprintf(&b, "| `cp` + `sync` of the copy | %s | %.0f | %.2f× | |\n", r.cpSync.Round(time.Millisecond), mbps(r.size, r.cpSync), r.cp.Seconds()/r.cpSync.Seconds())
	ratio := r.cp.Seconds() / r.cold.Seconds()
	fmt.Fprintf(&b, "| cold fetch: download + sha256 + fsync + rename (CPU %s) | %s | %.0f | **%.2f×** | %d |\n", r.coldCPU.Round(time.Millisecond), r.cold.Round(time.Millisecond), mbps(r.size, r.cold), ratio, r.downloadsCold)
	fmt.Fprintf(&b, "| %d concurrent fetches of the uncached image, until the last returns | %s | %.0f | %.2f× | **%d** |\n", r.concurrent, r.all.Round(time.Millisecond), mbps(r.size, r.all), r.cp.Seconds()/r.all.Seconds(), r.downloadsN)
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**NOT met**"
	}
	fmt.Fprintf(&b, "\nTargets: cold fetch ≥ 0.5× `cp` throughput — %.2f× (%.2f× of `cp` + `sync`), %s; %d concurrent fetches of one uncached image download it once — %d download(s), %s.\n",
		ratio, r.cpSync.Seconds()/r.cold.Seconds(), verdict(ratio >= 0.5), r.concurrent, r.downloadsN, verdict(r.downloadsN == 1))
	fmt.Fprintf(&b, "\nHow it runs: the image is uploaded through CreateImage first, so the API's blob was just written and its pages are warm in the page cache for both `cp` and the download (caches cannot be dropped on this shared machine); the copy and each cache's file are written cold. `cp` is coreutils `cp` of the blob to a new file beside it; the cache also fsyncs its file and directory before the rename, so the `cp` + `sync` row is the like-for-like write. The cold fetch is one `Ensure` into an empty cache: DownloadImage streams 1 MiB messages over TLS on loopback; the cache's own codec copies each message's data from gRPC's receive buffers into 4 MiB aligned buffers that one goroutine hashes while another writes them to a temporary file with O_DIRECT (past the page cache), then fsyncs and renames it into place. The concurrent row is %d `Ensure` calls at once into another empty cache on one host; DownloadImage calls are counted from the API's own `minicloud_api_requests_total` metric. CPU is this process's (API server, etcd and the cache together) during the cold fetch.\n", r.concurrent)
	return b.String()
}
