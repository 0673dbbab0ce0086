package imagecache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/minicloud/minicloud/agent/imagecache"
	"github.com/minicloud/minicloud/agent/qemuaccess"
	"github.com/minicloud/minicloud/api/imageservice"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

// serve runs srv on a real gRPC server on loopback with minicloud's error
// interceptors, counting DownloadImage calls, and returns a client.
func serve(t *testing.T, register func(*grpc.Server)) (minicloudv1.ImageServiceClient, *atomic.Int64) {
	t.Helper()
	var downloads atomic.Int64
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(errdefs.UnaryServerInterceptor),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if strings.HasSuffix(info.FullMethod, "/DownloadImage") {
				downloads.Add(1)
			}
			return h(srv, ss)
		}, errdefs.StreamServerInterceptor),
		// As the API server serves: image chunks go out uncopied.
		grpc.ForceServerCodecV2(imageservice.ServerCodec()),
	)
	register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(errdefs.UnaryClientInterceptor),
	}, imagecache.DialOptions()...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return minicloudv1.NewImageServiceClient(conn), &downloads
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestAgainstImageService downloads from the real image service (on a real
// embedded etcd): once, verified, shared by concurrent callers.
func TestAgainstImageService(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img missing: run hack/setup-host.sh")
	}
	_, etcd := etcdtest.Start(t)
	svc := imageservice.New(imageservice.Config{Client: etcd, Dir: filepath.Join(t.TempDir(), "blobs")})
	client, downloads := serve(t, func(s *grpc.Server) { minicloudv1.RegisterImageServiceServer(s, svc) })

	// A real qcow2 with some data in it, as `minicloud image create` sends.
	src := filepath.Join(t.TempDir(), "disk.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", src, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	diskBytes, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	img := upload(t, client, "tiny", diskBytes)
	if img.GetDisk().GetSha256() != sha(diskBytes) {
		t.Fatalf("service digest %s, want %s", img.GetDisk().GetSha256(), sha(diskBytes))
	}

	cache, err := imagecache.New(filepath.Join(t.TempDir(), "cache"), client, qemuaccess.Access{})
	if err != nil {
		t.Fatal(err)
	}
	digest := img.GetDisk().GetSha256()
	var wg sync.WaitGroup
	paths := make([]string, 8)
	errs := make([]error, 8)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = cache.Ensure(ctx, "tiny", minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
		}()
	}
	wg.Wait()
	for i := range paths {
		if errs[i] != nil || paths[i] != cache.Path(digest) {
			t.Fatalf("Ensure #%d = %q, %v", i, paths[i], errs[i])
		}
	}
	got, err := os.ReadFile(cache.Path(digest))
	if err != nil || !bytes.Equal(got, diskBytes) {
		t.Fatalf("cached file differs from the upload (err %v)", err)
	}
	if n := downloads.Load(); n != 1 {
		t.Errorf("%d downloads for 8 concurrent Ensure calls, want 1", n)
	}
	if _, err := cache.Ensure(ctx, "tiny", minicloudv1.ImagePart_IMAGE_PART_DISK, digest); err != nil || downloads.Load() != 1 {
		t.Errorf("cached Ensure: err %v, downloads %d; want no new download", err, downloads.Load())
	}
	// QEMU's group (here the zero Access: root's) reads it as a backing
	// file; other users, not at all (an image may be a project's own).
	if st, _ := os.Stat(cache.Path(digest)); st.Mode().Perm() != 0o640 {
		t.Errorf("cached file mode %v, want 0640", st.Mode())
	}
	if st, _ := os.Stat(cache.Dir()); st.Mode().Perm() != 0o710 {
		t.Errorf("cache directory mode %v, want 0710", st.Mode())
	}

	// An image that is not there is NotFound through the gRPC error mapping.
	other := sha([]byte("nope"))
	if _, err := cache.Ensure(ctx, "missing", minicloudv1.ImagePart_IMAGE_PART_DISK, other); !errdefs.IsNotFound(err) {
		t.Errorf("Ensure of a missing image: %v, want NotFound", err)
	}
	assertClean(t, cache, digest)
}

// Hosts fetching at once (a cache each, so a DownloadImage stream each)
// share the API's pool of chunk buffers, which gRPC frees back as it
// writes them: every host must still get exactly its image's bytes, with
// two images of different content in flight together.
func TestConcurrentHostsGetTheirOwnBytes(t *testing.T) {
	_, etcd := etcdtest.Start(t)
	svc := imageservice.New(imageservice.Config{Client: etcd, Dir: filepath.Join(t.TempDir(), "blobs")})
	client, downloads := serve(t, func(s *grpc.Server) { minicloudv1.RegisterImageServiceServer(s, svc) })
	images := map[string][]byte{"a": make([]byte, 5<<20+123), "b": make([]byte, 3<<20+4096)}
	digests := map[string]string{}
	for name, data := range images {
		if _, err := rand.Read(data); err != nil {
			t.Fatal(err)
		}
		digests[name] = upload(t, client, name, data).GetDisk().GetSha256()
	}
	const hosts = 4
	var wg sync.WaitGroup
	errs := make(chan error, hosts*len(images))
	for h := range hosts {
		cache, err := imagecache.New(filepath.Join(t.TempDir(), "cache"), client, qemuaccess.Access{})
		if err != nil {
			t.Fatal(err)
		}
		for name, data := range images {
			wg.Add(1)
			go func() {
				defer wg.Done()
				path, err := cache.Ensure(context.Background(), name, minicloudv1.ImagePart_IMAGE_PART_DISK, digests[name])
				if err != nil {
					errs <- fmt.Errorf("host %d, image %s: %w", h, name, err)
					return
				}
				if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, data) {
					errs <- fmt.Errorf("host %d, image %s: cached file differs from the upload (err %v)", h, name, err)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := downloads.Load(); n != hosts*int64(len(images)) {
		t.Errorf("%d downloads, want one per host and image (%d)", n, hosts*len(images))
	}
}

func upload(t *testing.T, c minicloudv1.ImageServiceClient, name string, disk []byte) *minicloudv1.Image {
	t.Helper()
	stream, err := c.CreateImage(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{Name: name, DiskSizeBytes: int64(len(disk))}}}); err != nil {
		t.Fatal(err)
	}
	for data := disk; len(data) > 0; {
		n := min(len(data), 256<<10)
		if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: data[:n]}}}); err != nil {
			break // the server's reason comes with CloseAndRecv
		}
		data = data[n:]
	}
	img, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatalf("upload %s: %v", name, err)
	}
	return img
}

// assertClean checks that the cache holds exactly the given digests and no
// temporary files.
func assertClean(t *testing.T, cache *imagecache.Cache, digests ...string) {
	t.Helper()
	ents, err := os.ReadDir(cache.Dir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != strings.Join(digests, ",") {
		t.Errorf("cache dir holds %v, want exactly %v", names, digests)
	}
}

// fileServer serves DownloadImage from files in memory and can corrupt the
// stream on the way, which the real service never does: it stands in for a
// broken network or disk between the API and the host.
type fileServer struct {
	minicloudv1.UnimplementedImageServiceServer
	blobs   map[string][]byte // sha256 -> bytes
	corrupt atomic.Bool
	// cut, if not zero, ends the stream after that many bytes: with an
	// error if cutFails, else as if the blob ended there.
	cut      atomic.Int64
	cutFails atomic.Bool
}

func (s *fileServer) DownloadImage(req *minicloudv1.DownloadImageRequest, stream minicloudv1.ImageService_DownloadImageServer) error {
	b, ok := s.blobs[req.GetSha256()]
	if !ok {
		return errdefs.NotFound("image %q has no blob %s", req.GetName(), req.GetSha256())
	}
	b = bytes.Clone(b)
	if s.corrupt.Load() {
		b[len(b)/2] ^= 0xff
	}
	if cut := s.cut.Load(); cut > 0 {
		b = b[:cut]
	}
	for len(b) > 0 {
		n := min(len(b), 64<<10)
		if err := stream.Send(&minicloudv1.DownloadImageResponse{Data: b[:n]}); err != nil {
			return err
		}
		b = b[n:]
	}
	if s.cut.Load() > 0 && s.cutFails.Load() {
		return errdefs.Unavailable("connection to the image store lost")
	}
	return nil
}

func TestCorruptDownloadIsRefused(t *testing.T) {
	data := make([]byte, 300<<10)
	if _, err := io.ReadFull(rand.Reader, data); err != nil {
		t.Fatal(err)
	}
	digest := sha(data)
	fs := &fileServer{blobs: map[string][]byte{digest: data}}
	fs.corrupt.Store(true)
	client, downloads := serve(t, func(s *grpc.Server) { minicloudv1.RegisterImageServiceServer(s, fs) })
	cache, err := imagecache.New(filepath.Join(t.TempDir(), "cache"), client, qemuaccess.Access{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = cache.Ensure(ctx, "img", minicloudv1.ImagePart_IMAGE_PART_KERNEL, digest)
	if !errors.Is(err, imagecache.ErrDigestMismatch) || !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("corrupt download: %v, want ErrDigestMismatch (FailedPrecondition)", err)
	}
	if cache.Has(digest) {
		t.Fatal("a corrupt download was cached")
	}
	assertClean(t, cache)

	// The next attempt, with the transfer healthy again, succeeds.
	fs.corrupt.Store(false)
	p, err := cache.Ensure(ctx, "img", minicloudv1.ImagePart_IMAGE_PART_KERNEL, digest)
	if err != nil {
		t.Fatalf("Ensure after repair: %v", err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, data) {
		t.Fatal("cached bytes differ")
	}
	if downloads.Load() != 2 {
		t.Errorf("%d downloads, want 2", downloads.Load())
	}
	assertClean(t, cache, digest)
}

// TestTruncatedDownloadIsRefused: a stream that ends early, cleanly or
// with an error, leaves nothing in the cache, and the error says which.
// The image is several write buffers long and cut off the alignment of
// direct writes, so the partial file had direct and buffered writes.
func TestTruncatedDownloadIsRefused(t *testing.T) {
	data := make([]byte, 9<<20+4321)
	if _, err := io.ReadFull(rand.Reader, data); err != nil {
		t.Fatal(err)
	}
	digest := sha(data)
	fs := &fileServer{blobs: map[string][]byte{digest: data}}
	client, _ := serve(t, func(s *grpc.Server) { minicloudv1.RegisterImageServiceServer(s, fs) })
	cache, err := imagecache.New(filepath.Join(t.TempDir(), "cache"), client, qemuaccess.Access{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	fs.cut.Store(int64(len(data) - 1000))
	_, err = cache.Ensure(ctx, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
	if !errors.Is(err, imagecache.ErrDigestMismatch) {
		t.Fatalf("download cut short: %v, want ErrDigestMismatch", err)
	}
	assertClean(t, cache)

	fs.cutFails.Store(true)
	_, err = cache.Ensure(ctx, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
	if !errdefs.IsUnavailable(err) || errors.Is(err, imagecache.ErrDigestMismatch) {
		t.Fatalf("download broken off: %v, want the stream's Unavailable", err)
	}
	assertClean(t, cache)

	fs.cut.Store(0)
	p, err := cache.Ensure(ctx, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, digest)
	if err != nil {
		t.Fatalf("whole download: %v", err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, data) {
		t.Fatal("cached bytes differ")
	}
	assertClean(t, cache, digest)
}

func TestInvalidDigestIsRefusedBeforeAnyIO(t *testing.T) {
	fs := &fileServer{blobs: map[string][]byte{}}
	client, downloads := serve(t, func(s *grpc.Server) { minicloudv1.RegisterImageServiceServer(s, fs) })
	cache, err := imagecache.New(filepath.Join(t.TempDir(), "cache"), client, qemuaccess.Access{})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"", "../../etc/passwd", strings.Repeat("A", 64), strings.Repeat("g", 64)} {
		if _, err := cache.Ensure(context.Background(), "x", minicloudv1.ImagePart_IMAGE_PART_DISK, d); !errdefs.IsInvalid(err) {
			t.Errorf("Ensure(%q) = %v, want Invalid", d, err)
		}
	}
	if downloads.Load() != 0 {
		t.Errorf("%d downloads for invalid digests", downloads.Load())
	}
}

func TestGCKeepsWhatIsInUse(t *testing.T) {
	blobs := map[string][]byte{}
	var digests []string
	for _, s := range []string{"a", "b", "c"} {
		b := bytes.Repeat([]byte(s), 1000)
		blobs[sha(b)] = b
		digests = append(digests, sha(b))
	}
	client, _ := serve(t, func(s *grpc.Server) { minicloudv1.RegisterImageServiceServer(s, &fileServer{blobs: blobs}) })
	cache, err := imagecache.New(filepath.Join(t.TempDir(), "cache"), client, qemuaccess.Access{})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range digests {
		if _, err := cache.Ensure(context.Background(), "x", minicloudv1.ImagePart_IMAGE_PART_DISK, d); err != nil {
			t.Fatal(err)
		}
	}
	// Debris of a download interrupted by a crash, and a file not ours.
	debris := filepath.Join(cache.Dir(), ".download-"+digests[0]+"-123")
	if err := os.WriteFile(debris, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cache.Dir(), "README"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	removed, err := cache.GC(func(d string) bool { return d == digests[1] })
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 2 {
		t.Errorf("removed %v, want the two unused digests", removed)
	}
	if !cache.Has(digests[1]) || cache.Has(digests[0]) || cache.Has(digests[2]) {
		t.Error("GC removed the wrong digests")
	}
	if _, err := os.Stat(debris); !os.IsNotExist(err) {
		t.Error("GC left the debris of an interrupted download")
	}
	if _, err := os.Stat(filepath.Join(cache.Dir(), "README")); err != nil {
		t.Error("GC removed a file that is not a cache entry")
	}
	list, err := cache.List()
	if err != nil || len(list) != 1 || list[0] != digests[1] {
		t.Errorf("List = %v, %v", list, err)
	}
}
