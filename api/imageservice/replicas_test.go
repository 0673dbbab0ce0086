package imageservice

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

// replicas starts two image services (A and B) on one real etcd and one
// shared blob directory, each behind its own gRPC server.
func replicas(t *testing.T) (a, b *env) {
	t.Helper()
	_, etcd := etcdtest.Start(t)
	dir := filepath.Join(t.TempDir(), "images")
	return newEnvOn(t, etcd, dir, 0), newEnvOn(t, etcd, dir, 0)
}

func mustDownload(t *testing.T, c minicloudv1.ImageServiceClient, name string, part minicloudv1.ImagePart, want []byte) {
	t.Helper()
	got, err := download(t, c, &minicloudv1.DownloadImageRequest{Name: name, Part: part, Sha256: digest(want)})
	if err != nil {
		t.Fatalf("download %s %v: %v", name, part, err)
	}
	if !bytes.Equal(got, want) || digest(got) != digest(want) {
		t.Fatalf("download %s %v: %d bytes with sha256 %s, want %d bytes with %s", name, part, len(got), digest(got), len(want), digest(want))
	}
}

// TestUploadOnOneReplicaServedByAnother: what A took is served by B, also
// after A is gone.
func TestUploadOnOneReplicaServedByAnother(t *testing.T) {
	a, b := replicas(t)
	ctx := context.Background()
	p := parts{disk: randomBytes(t, 2<<20+5), kernel: randomBytes(t, 70<<10)}
	if _, err := uploadImage(ctx, a.client, &minicloudv1.CreateImageHeader{Name: "shared"}, p); err != nil {
		t.Fatal(err)
	}
	mustDownload(t, b.client, "shared", minicloudv1.ImagePart_IMAGE_PART_DISK, p.disk)
	mustDownload(t, b.client, "shared", minicloudv1.ImagePart_IMAGE_PART_KERNEL, p.kernel)

	a.stop()
	// B's start-up collection must not take what A uploaded.
	if err := b.svc.CollectGarbage(ctx); err != nil {
		t.Fatal(err)
	}
	mustDownload(t, b.client, "shared", minicloudv1.ImagePart_IMAGE_PART_DISK, p.disk)
	// And a replica started afterwards (its New collects garbage) too.
	c := newEnvOn(t, b.etcd, b.dir, 0)
	mustDownload(t, c.client, "shared", minicloudv1.ImagePart_IMAGE_PART_KERNEL, p.kernel)
}

// waitTempFile waits until an upload's temporary file is in dir.
func waitTempFile(t *testing.T, e *env) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, f := range e.dirFiles(t) {
			if strings.HasPrefix(f, tempPrefix) {
				return f
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("no upload in progress appeared in the blob directory")
	return ""
}

// TestGarbageCollectionSparesOtherReplicasUploads: B collects garbage (as
// at its start) while A is half-way through an upload; A's upload still
// completes and is served intact by both. Once A is gone, the debris of its
// unfinished upload is collected.
func TestGarbageCollectionSparesOtherReplicasUploads(t *testing.T) {
	a, b := replicas(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	disk := randomBytes(t, 3<<20)

	stream, err := a.client.CreateImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(data []byte) {
		t.Helper()
		if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: data}}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{Name: "inflight", DiskSizeBytes: int64(len(disk))}}}); err != nil {
		t.Fatal(err)
	}
	send(disk[:1<<20])
	temp := waitTempFile(t, a)

	if err := b.svc.CollectGarbage(context.Background()); err != nil {
		t.Fatal(err)
	}
	newEnvOn(t, b.etcd, b.dir, 0) // a replica starting now collects too
	if _, err := os.Stat(filepath.Join(a.dir, temp)); err != nil {
		t.Fatalf("another replica's garbage collection removed the upload in progress: %v", err)
	}

	send(disk[1<<20:])
	img, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatalf("upload after the other replica's collection: %v", err)
	}
	if img.GetDisk().GetSha256() != digest(disk) {
		t.Fatalf("stored sha256 %s, want %s", img.GetDisk().GetSha256(), digest(disk))
	}
	mustDownload(t, a.client, "inflight", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)
	mustDownload(t, b.client, "inflight", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)

	// A replica that dies mid-upload leaves a temporary file; once its
	// etcd session is gone, any replica may collect it.
	stream2, err := a.client.CreateImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stream2.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{Name: "orphaned"}}})
	stream2.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: disk[:4096]}}})
	orphan := waitTempFile(t, a)
	// Only the session goes, as when the process is killed: the file stays.
	a.svc.replica.close()
	if err := b.svc.CollectGarbage(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(b.dir, orphan)); !os.IsNotExist(err) {
		t.Fatalf("the dead replica's unfinished upload %s was not collected: %v", orphan, err)
	}
	if files := b.dirFiles(t); len(files) != 1 || files[0] != digest(disk) {
		t.Fatalf("blob directory holds %v, want only the committed blob", files)
	}
}

// TestCommitAndCollectAcrossReplicas races uploads of one content on A
// with garbage collection on B: every image that exists has its blob.
func TestCommitAndCollectAcrossReplicas(t *testing.T) {
	a, b := replicas(t)
	ctx := context.Background()
	disk := randomBytes(t, 256<<10)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := b.svc.CollectGarbage(ctx); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := range 10 {
		name := "race-" + string(rune('a'+i))
		if _, err := uploadImage(ctx, a.client, &minicloudv1.CreateImageHeader{Name: name}, parts{disk: disk}); err != nil {
			t.Fatal(err)
		}
		mustDownload(t, b.client, name, minicloudv1.ImagePart_IMAGE_PART_DISK, disk)
		if i%2 == 1 {
			// Deleting one name must keep the blob the others share.
			if _, err := b.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: name}); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	<-done
	mustDownload(t, a.client, "race-a", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)
}

// TestMissingBlobIsNotPermanent: a replica that cannot see a blob (its own
// directory instead of the shared store) answers Unavailable, which
// clients retry elsewhere, never FailedPrecondition, which an agent takes
// as a permanently unusable image. A corrupt blob is FailedPrecondition
// and names the digests.
func TestMissingBlobIsNotPermanent(t *testing.T) {
	a, _ := replicas(t)
	ctx := context.Background()
	disk := randomBytes(t, 64<<10)
	if _, err := uploadImage(ctx, a.client, &minicloudv1.CreateImageHeader{Name: "img"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	lonely := newEnvOn(t, a.etcd, filepath.Join(t.TempDir(), "other"), 0)
	_, err := download(t, lonely.client, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	wantCode(t, err, codes.Unavailable)

	bad := bytes.Clone(disk)
	bad[100] ^= 0xff
	if err := os.WriteFile(filepath.Join(a.dir, digest(disk)), bad, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = download(t, a.client, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	wantCode(t, err, codes.FailedPrecondition)
	if !strings.Contains(err.Error(), digest(bad)) || !strings.Contains(err.Error(), digest(disk)) {
		t.Fatalf("corrupt blob error %q does not name both digests", err)
	}
}
