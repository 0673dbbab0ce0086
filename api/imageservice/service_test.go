package imageservice

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/imageformat/imageformattest"
	"github.com/minicloud/minicloud/pkg/store"
)

// env is an image service on a real embedded etcd, served over a real gRPC
// server (in-memory listener) with the same interceptors as the API server.
type env struct {
	etcd   *clientv3.Client
	dir    string
	client minicloudv1.ImageServiceClient
	svc    *Service
	inUse  map[string]string
	// onInUse, if set, runs inside every InUse call (to race with deletes).
	onInUse func(image string)
	// createDone receives the error of every CreateImage handler once it has
	// returned, so tests can check what a failed upload left behind.
	createDone chan error
	// stop stops the gRPC server and closes the service (a replica gone).
	stop func()
}

func newEnv(t *testing.T, maxBytes int64) *env {
	t.Helper()
	_, etcd := etcdtest.Start(t)
	return newEnvOn(t, etcd, filepath.Join(t.TempDir(), "images"), maxBytes)
}

// newEnvOn is newEnv on a given etcd and blob directory: several envs on
// one etcd and one directory are replicas of one control plane.
func newEnvOn(t *testing.T, etcd *clientv3.Client, dir string, maxBytes int64) *env {
	t.Helper()
	return newEnvWith(t, etcd, dir, maxBytes, grpc.ForceServerCodecV2(ServerCodec()))
}

// newEnvWith is newEnvOn with these server options instead of the API
// server's codec.
func newEnvWith(t *testing.T, etcd *clientv3.Client, dir string, maxBytes int64, opts ...grpc.ServerOption) *env {
	t.Helper()
	e := &env{etcd: etcd, dir: dir, inUse: map[string]string{}, createDone: make(chan error, 16)}
	e.svc = New(Config{
		Client: etcd,
		Dir:    e.dir,
		InUse: func(_ context.Context, image string) (string, error) {
			vm := e.inUse[image]
			if e.onInUse != nil {
				e.onInUse(image)
			}
			return vm, nil
		},
		MaxImageBytes: maxBytes,
	})
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(errdefs.UnaryServerInterceptor),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			err := h(srv, ss)
			if strings.HasSuffix(info.FullMethod, "/CreateImage") {
				e.createDone <- err
			}
			return err
		}, errdefs.StreamServerInterceptor),
	}, opts...)...)
	minicloudv1.RegisterImageServiceServer(srv, e.svc)
	go srv.Serve(lis)
	e.stop = func() { srv.Stop(); e.svc.Close() }
	t.Cleanup(e.stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(errdefs.UnaryClientInterceptor),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.client = minicloudv1.NewImageServiceClient(conn)
	return e
}

type parts struct {
	disk, kernel, initrd []byte
}

func uploadImage(ctx context.Context, c minicloudv1.ImageServiceClient, hdr *minicloudv1.CreateImageHeader, p parts) (*minicloudv1.Image, error) {
	stream, err := c.CreateImage(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: hdr}}); err != nil {
		return stream.CloseAndRecv()
	}
	for _, part := range []struct {
		p    minicloudv1.ImagePart
		data []byte
	}{{minicloudv1.ImagePart_IMAGE_PART_DISK, p.disk}, {minicloudv1.ImagePart_IMAGE_PART_KERNEL, p.kernel}, {minicloudv1.ImagePart_IMAGE_PART_INITRD, p.initrd}} {
		for data := part.data; len(data) > 0; {
			n := min(len(data), 256<<10)
			err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: part.p, Data: data[:n]}}})
			if err != nil {
				// The server gave up; CloseAndRecv has its reason.
				return stream.CloseAndRecv()
			}
			data = data[n:]
		}
	}
	return stream.CloseAndRecv()
}

func download(t *testing.T, c minicloudv1.ImageServiceClient, req *minicloudv1.DownloadImageRequest) ([]byte, error) {
	t.Helper()
	stream, err := c.DownloadImage(context.Background(), req)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return buf.Bytes(), nil
		}
		if err != nil {
			return nil, err
		}
		if len(msg.GetData()) > downloadChunkSize {
			t.Fatalf("chunk of %d bytes, more than %d", len(msg.GetData()), downloadChunkSize)
		}
		buf.Write(msg.GetData())
	}
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	// Unary errors come back as errdefs kinds (client interceptor), stream
	// errors as status errors; ToGRPC maps both to a code.
	if got := status.Code(errdefs.ToGRPC(err)); got != want {
		t.Fatalf("got %v (%v), want code %v", got, err, want)
	}
}

// dirFiles lists the image directory.
func (e *env) dirFiles(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	return names
}

func (e *env) imageKeys(t *testing.T) int64 {
	t.Helper()
	resp, err := e.etcd.Get(context.Background(), store.ImagePrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

// expectNothingLeft waits for the failed CreateImage handler to return and
// checks that it left no file and no key.
func (e *env) expectNothingLeft(t *testing.T) {
	t.Helper()
	select {
	case err := <-e.createDone:
		if err == nil {
			t.Fatal("CreateImage succeeded, expected a failure")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("CreateImage handler did not return")
	}
	if files := e.dirFiles(t); len(files) != 0 {
		t.Fatalf("failed upload left files: %v", files)
	}
	if n := e.imageKeys(t); n != 0 {
		t.Fatalf("failed upload left %d image keys", n)
	}
}

func TestUploadDownloadRoundTrip(t *testing.T) {
	t.Run("API server codec", func(t *testing.T) { testUploadDownloadRoundTrip(t, newEnv(t, 0)) })
	// A server without ServerCodec marshals each chunk as the plain
	// message it also is.
	t.Run("proto codec", func(t *testing.T) {
		_, etcd := etcdtest.Start(t)
		testUploadDownloadRoundTrip(t, newEnvWith(t, etcd, filepath.Join(t.TempDir(), "images"), 0))
	})
}

func testUploadDownloadRoundTrip(t *testing.T, e *env) {
	ctx := context.Background()
	p := parts{disk: randomBytes(t, 3<<20+17), kernel: randomBytes(t, 100<<10), initrd: randomBytes(t, 1<<20)}
	img, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{
		Name: "debian", Cmdline: "console=ttyS0", RequiredHypervisor: "tcg",
		DiskSizeBytes: int64(len(p.disk)), KernelSizeBytes: int64(len(p.kernel)), InitrdSizeBytes: int64(len(p.initrd)),
	}, p)
	if err != nil {
		t.Fatalf("CreateImage: %v", err)
	}
	if img.GetFormat() != minicloudv1.ImageFormat_IMAGE_FORMAT_RAW || img.GetVirtualSizeBytes() != int64(len(p.disk)) {
		t.Fatalf("format %v virtual size %d", img.GetFormat(), img.GetVirtualSizeBytes())
	}
	if img.GetDisk().GetSha256() != digest(p.disk) || img.GetKernel().GetSha256() != digest(p.kernel) || img.GetInitrd().GetSha256() != digest(p.initrd) {
		t.Fatalf("digests do not match the uploaded bytes: %v", img)
	}
	if img.GetMinDiskGib() != 1 || img.GetMeta().GetId() == "" || img.GetMeta().GetResourceVersion() == 0 {
		t.Fatalf("metadata: %v", img)
	}

	got, err := e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "debian"})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetDisk().GetSha256() != img.GetDisk().GetSha256() || got.GetCmdline() != "console=ttyS0" || got.GetMeta().GetResourceVersion() != img.GetMeta().GetResourceVersion() {
		t.Fatalf("GetImage = %v, CreateImage returned %v", got, img)
	}

	for part, want := range map[minicloudv1.ImagePart][]byte{
		minicloudv1.ImagePart_IMAGE_PART_DISK:   p.disk,
		minicloudv1.ImagePart_IMAGE_PART_KERNEL: p.kernel,
		minicloudv1.ImagePart_IMAGE_PART_INITRD: p.initrd,
	} {
		data, err := download(t, e.client, &minicloudv1.DownloadImageRequest{Name: "debian", Part: part, Sha256: digest(want)})
		if err != nil {
			t.Fatalf("download %v: %v", part, err)
		}
		if !bytes.Equal(data, want) {
			t.Fatalf("download %v: %d bytes differ from the %d uploaded", part, len(data), len(want))
		}
	}
	_, err = download(t, e.client, &minicloudv1.DownloadImageRequest{Name: "debian", Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Sha256: digest([]byte("other"))})
	wantCode(t, err, codes.FailedPrecondition)
	_, err = download(t, e.client, &minicloudv1.DownloadImageRequest{Name: "nope", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	wantCode(t, err, codes.NotFound)
}

func TestDuplicateNameAndSharedBlobs(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	disk := randomBytes(t, 1<<20)
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "a"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	_, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "a"}, parts{disk: randomBytes(t, 10)})
	wantCode(t, err, codes.AlreadyExists)
	<-e.createDone // first upload
	<-e.createDone // refused duplicate
	if files := e.dirFiles(t); len(files) != 1 || files[0] != digest(disk) {
		t.Fatalf("files after duplicate: %v", files)
	}

	// Same bytes under another name are stored once.
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "b"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	if files := e.dirFiles(t); len(files) != 1 {
		t.Fatalf("identical disks stored twice: %v", files)
	}
	list, err := e.client.ListImages(ctx, &minicloudv1.ListImagesRequest{})
	if err != nil || len(list.GetImages()) != 2 || list.GetImages()[0].GetMeta().GetName() != "a" {
		t.Fatalf("ListImages = %v, %v", list, err)
	}

	// The blob stays while one image still uses it.
	if _, err := e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "a"}); err != nil {
		t.Fatal(err)
	}
	if files := e.dirFiles(t); len(files) != 1 {
		t.Fatalf("shared blob removed: %v", files)
	}
	data, err := download(t, e.client, &minicloudv1.DownloadImageRequest{Name: "b", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	if err != nil || !bytes.Equal(data, disk) {
		t.Fatalf("download b after deleting a: %v", err)
	}
	if _, err := e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "b"}); err != nil {
		t.Fatal(err)
	}
	if files := e.dirFiles(t); len(files) != 0 {
		t.Fatalf("blob left after its last image was deleted: %v", files)
	}
	_, err = e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "b"})
	wantCode(t, err, codes.NotFound)
}

func TestDeleteInUse(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "used"}, parts{disk: randomBytes(t, 4096)}); err != nil {
		t.Fatal(err)
	}
	e.inUse["used"] = "web1"
	_, err := e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "used"})
	wantCode(t, err, codes.FailedPrecondition)
	if !strings.Contains(err.Error(), "web1") {
		t.Fatalf("error does not name the VM: %v", err)
	}
	if _, err := e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "used"}); err != nil {
		t.Fatalf("image gone after refused delete: %v", err)
	}
	if len(e.dirFiles(t)) != 1 {
		t.Fatal("blob gone after refused delete")
	}
}

// TestDeleteRacingVMCreate creates a VM (its spec key, as the API's create
// transaction would) after the in-use check has passed and before the
// delete commits: the delete must notice, check again and refuse.
func TestDeleteRacingVMCreate(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "racy"}, parts{disk: randomBytes(t, 4096)}); err != nil {
		t.Fatal(err)
	}
	checks := 0
	e.onInUse = func(image string) {
		checks++
		if checks == 1 {
			if _, err := e.etcd.Put(ctx, store.VMSpecKey("vm-1"), "spec"); err != nil {
				t.Error(err)
			}
			e.inUse[image] = "web1"
		}
	}
	_, err := e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "racy"})
	wantCode(t, err, codes.FailedPrecondition)
	if checks != 2 || !strings.Contains(err.Error(), "web1") {
		t.Fatalf("%d in-use checks, error %v; want a second check that finds web1", checks, err)
	}
	if _, err := e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "racy"}); err != nil {
		t.Fatalf("image deleted under a new VM: %v", err)
	}
}

func TestQCOW2Images(t *testing.T) {
	work := t.TempDir()
	base := imageformattest.QemuImg(t, work, "-f", "raw", "base.raw", "2M")
	plain := imageformattest.QemuImg(t, work, "-f", "qcow2", "plain.qcow2", "2G")
	backed := imageformattest.QemuImg(t, work, "-f", "qcow2", "-b", "base.raw", "-F", "raw", "backed.qcow2", "2M")
	external := imageformattest.QemuImg(t, work, "-f", "qcow2", "-o", "data_file=data.raw", "external.qcow2", "2M")
	ctx := context.Background()

	t.Run("raw accepted", func(t *testing.T) {
		e := newEnv(t, 0)
		img, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "raw"}, parts{disk: base})
		if err != nil {
			t.Fatal(err)
		}
		if img.GetFormat() != minicloudv1.ImageFormat_IMAGE_FORMAT_RAW || img.GetVirtualSizeBytes() != 2<<20 {
			t.Fatalf("got %v, %d bytes", img.GetFormat(), img.GetVirtualSizeBytes())
		}
	})
	t.Run("plain qcow2 accepted", func(t *testing.T) {
		e := newEnv(t, 0)
		// The name says raw; the bytes say qcow2, and the bytes win.
		img, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "looks-raw"}, parts{disk: plain})
		if err != nil {
			t.Fatal(err)
		}
		if img.GetFormat() != minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2 || img.GetVirtualSizeBytes() != 2<<30 || img.GetMinDiskGib() != 2 {
			t.Fatalf("got %v, %d bytes, min disk %d", img.GetFormat(), img.GetVirtualSizeBytes(), img.GetMinDiskGib())
		}
		_, err = uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "too-small", MinDiskGib: 1}, parts{disk: plain})
		wantCode(t, err, codes.InvalidArgument)
	})
	for name, disk := range map[string][]byte{"backing file": backed, "external data file": external} {
		t.Run(name+" refused", func(t *testing.T) {
			e := newEnv(t, 0)
			_, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "evil"}, parts{disk: disk})
			wantCode(t, err, codes.InvalidArgument)
			t.Logf("refused: %v", err)
			e.expectNothingLeft(t)
		})
	}
}

func TestInterruptedUploadLeavesNothing(t *testing.T) {
	e := newEnv(t, 0)
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := e.client.CreateImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(m *minicloudv1.CreateImageRequest) {
		if err := stream.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{Name: "partial"}}})
	for range 4 {
		send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: randomBytes(t, 256<<10)}}})
	}
	cancel()
	e.expectNothingLeft(t)
}

func TestTruncatedUploadRefused(t *testing.T) {
	e := newEnv(t, 0)
	disk := randomBytes(t, 1<<20)
	// The header announces more than arrives, as when a client stops early.
	_, err := uploadImage(context.Background(), e.client, &minicloudv1.CreateImageHeader{Name: "short", DiskSizeBytes: int64(len(disk)) + 1}, parts{disk: disk})
	wantCode(t, err, codes.InvalidArgument)
	e.expectNothingLeft(t)
}

func TestOversizeUploadRefused(t *testing.T) {
	e := newEnv(t, 1<<20)
	ctx := context.Background()
	// Announced: refused before any data.
	_, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "big", DiskSizeBytes: 2 << 20}, parts{disk: randomBytes(t, 10)})
	wantCode(t, err, codes.ResourceExhausted)
	e.expectNothingLeft(t)
	// Not announced: refused once the stream passes the limit.
	_, err = uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "big"}, parts{disk: randomBytes(t, 1<<20), kernel: randomBytes(t, 1)})
	wantCode(t, err, codes.ResourceExhausted)
	e.expectNothingLeft(t)
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	disk := randomBytes(t, 4096)
	for _, tc := range []struct {
		name string
		hdr  *minicloudv1.CreateImageHeader
		p    parts
	}{
		{"uppercase name", &minicloudv1.CreateImageHeader{Name: "Debian"}, parts{disk: disk}},
		{"empty name", &minicloudv1.CreateImageHeader{}, parts{disk: disk}},
		{"long name", &minicloudv1.CreateImageHeader{Name: strings.Repeat("a", 64)}, parts{disk: disk}},
		{"no disk", &minicloudv1.CreateImageHeader{Name: "k"}, parts{kernel: disk}},
		{"initrd without kernel", &minicloudv1.CreateImageHeader{Name: "k"}, parts{disk: disk, initrd: disk}},
		{"cmdline without kernel", &minicloudv1.CreateImageHeader{Name: "k", Cmdline: "quiet"}, parts{disk: disk}},
		{"unknown hypervisor", &minicloudv1.CreateImageHeader{Name: "k", RequiredHypervisor: "xen"}, parts{disk: disk}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := uploadImage(ctx, e.client, tc.hdr, tc.p)
			wantCode(t, err, codes.InvalidArgument)
			e.expectNothingLeft(t)
		})
	}
	t.Run("chunk before header", func(t *testing.T) {
		stream, err := e.client.CreateImage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: disk}}})
		_, err = stream.CloseAndRecv()
		wantCode(t, err, codes.InvalidArgument)
		e.expectNothingLeft(t)
	})
	_, err := e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "Bad_Name"})
	wantCode(t, err, codes.InvalidArgument)
	_, err = e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "missing"})
	wantCode(t, err, codes.NotFound)
}

// TestGarbageFromCrashIsCollected simulates a crash between committing a
// blob and writing its key, and in the middle of an upload: a new Service
// on the same directory removes both, and keeps referenced blobs.
func TestGarbageFromCrashIsCollected(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	disk := randomBytes(t, 8192)
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "keep"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	orphan := digest([]byte("orphan"))
	for _, name := range []string{orphan, tempPrefix + "123", "README"} {
		if err := os.WriteFile(filepath.Join(e.dir, name), []byte("orphan"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	New(Config{Client: e.etcd, Dir: e.dir})
	files := e.dirFiles(t)
	if len(files) != 2 || !contains(files, digest(disk)) || !contains(files, "README") {
		t.Fatalf("after restart the directory holds %v, want the referenced blob and the foreign file", files)
	}
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}

// TestUploadRefusedBelowTheFreeSpaceFloor: an upload that would leave the
// image store's file system with less than the floor is refused — before
// any data when its size is announced, at the chunk otherwise — and leaves
// nothing behind.
func TestUploadRefusedBelowTheFreeSpaceFloor(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	var st unix.Statfs_t
	if err := unix.Statfs(e.dir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	// A floor 32 MiB under what is free: a 1 MiB upload fits, 64 MiB do
	// not (the slack either way absorbs what else writes to this disk
	// meanwhile).
	e.svc.minFree = free - 32<<20
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "fits"}, parts{disk: randomBytes(t, 1<<20)}); err != nil {
		t.Fatalf("an upload above the floor: %v", err)
	}
	_, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "big", DiskSizeBytes: 64 << 20}, parts{disk: randomBytes(t, 10)})
	wantCode(t, err, codes.ResourceExhausted)
	before := len(e.dirFiles(t))
	_, err = uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "big"}, parts{disk: randomBytes(t, 64<<20)})
	wantCode(t, err, codes.ResourceExhausted)
	if after := len(e.dirFiles(t)); after != before {
		t.Fatalf("a refused upload left files: %d before, %d after", before, after)
	}
}

// TestDisguisedImagesRefused: uploads that minicloud would store as raw (or
// qcow2) but that QEMU, left to guess, would open as another format. The
// first is issue 12's: a VMDK descriptor whose extent is a host file.
func TestDisguisedImagesRefused(t *testing.T) {
	work := t.TempDir()
	qcow2 := imageformattest.QemuImg(t, work, "-f", "qcow2", "-o", "cluster_size=512", "plain.qcow2", "1M")
	vdiInside := bytes.Clone(qcow2)
	binary.LittleEndian.PutUint32(vdiInside[64:], 0xbeda107f) // VDI's signature, in the qcow2 header
	ctx := context.Background()
	for _, tc := range []struct {
		name, want string
		disk       []byte
	}{
		{"vmdk descriptor, version line first", "VMDK", []byte("version=1\nRW 1 FLAT \"/etc/hostname\" 0\n")},
		{"vmdk descriptor after comments", "VMDK", []byte("# exported\n  \nversion=2\r\ncreateType=\"monolithicFlat\"\r\nRW 1 FLAT \"/etc/shadow\" 0\r\n")},
		{"vdi signature in a qcow2", "several formats (qcow2, vdi)", vdiInside},
		{"vmdk", "VMDK", imageformattest.QemuImg(t, work, "-f", "vmdk", "x.vmdk", "1M")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 0)
			_, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "disguised"}, parts{disk: tc.disk})
			wantCode(t, err, codes.InvalidArgument)
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v does not say %q", err, tc.want)
			}
			t.Logf("refused: %v", err)
			e.expectNothingLeft(t)
		})
	}
}

// TestDeclaredFormat: an uploader that says what the disk is gets that or
// a refusal, never the other format. A raw disk whose first bytes are a
// qcow2 header (a guest's own image file at the start of its disk) is the
// case the declaration decides.
func TestDeclaredFormat(t *testing.T) {
	work := t.TempDir()
	qcow2 := imageformattest.QemuImg(t, work, "-f", "qcow2", "-o", "cluster_size=512", "plain.qcow2", "1M")
	raw := randomBytes(t, 4096)
	raw[0] = 0 // not by chance another format's magic
	ctx := context.Background()
	e := newEnv(t, 0)
	for _, tc := range []struct {
		name     string
		declared minicloudv1.ImageFormat
		disk     []byte
		want     codes.Code
	}{
		{"qcow2 declared qcow2", minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2, qcow2, codes.OK},
		{"raw declared raw", minicloudv1.ImageFormat_IMAGE_FORMAT_RAW, raw, codes.OK},
		{"qcow2 declared raw", minicloudv1.ImageFormat_IMAGE_FORMAT_RAW, qcow2, codes.InvalidArgument},
		{"raw declared qcow2", minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2, raw, codes.InvalidArgument},
		{"vmdk descriptor declared raw", minicloudv1.ImageFormat_IMAGE_FORMAT_RAW, []byte("version=1\nRW 1 FLAT \"/etc/hostname\" 0\n"), codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.ReplaceAll(tc.name, " ", "-")
			img, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: name, Format: tc.declared}, parts{disk: tc.disk})
			wantCode(t, err, tc.want)
			if err != nil {
				t.Logf("refused: %v", err)
				return
			}
			if img.GetFormat() != tc.declared {
				t.Fatalf("stored as %v, declared %v", img.GetFormat(), tc.declared)
			}
		})
	}
}
