package imageservice

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestAnotherReplicaChecksANewImagesBlobs: B, which did not take the
// upload, sees the image appear and checks its blobs in the background, so
// a host's first fetch from B finds them remembered. A replica started
// later does not check the blobs of the images already there (an
// operator's restart is not a scrub of the store), but does check those of
// images created after its start.
func TestAnotherReplicaChecksANewImagesBlobs(t *testing.T) {
	a, b := replicas(t)
	ctx := context.Background()
	p := parts{disk: randomBytes(t, 2<<20+512), kernel: randomBytes(t, 70<<10)}
	if _, err := uploadImage(ctx, a.client, &minicloudv1.CreateImageHeader{Name: "new"}, p); err != nil {
		t.Fatal(err)
	}
	waitRemembered(t, b, digest(p.disk), filepath.Join(b.dir, digest(p.disk)))
	waitRemembered(t, b, digest(p.kernel), filepath.Join(b.dir, digest(p.kernel)))
	mustDownload(t, b.client, "new", minicloudv1.ImagePart_IMAGE_PART_DISK, p.disk)

	c := newEnvOn(t, a.etcd, a.dir, 0)
	later := randomBytes(t, 1<<20)
	if _, err := uploadImage(ctx, a.client, &minicloudv1.CreateImageHeader{Name: "later"}, parts{disk: later}); err != nil {
		t.Fatal(err)
	}
	// C checks in the order images appear: once the later one is
	// remembered, an earlier one it had queued would be too.
	waitRemembered(t, c, digest(later), filepath.Join(c.dir, digest(later)))
	if c.svc.verified.verified(digest(p.disk), stat(t, filepath.Join(c.dir, digest(p.disk)))) {
		t.Fatal("a replica checked the blob of an image that existed before its start")
	}
}

// TestAServeJoinsTheRunningCheck: a fetch from B while B's background
// check of that blob runs does not hash the blob a second time: it joins
// the check, and its status waits for the check's verdict. Shown with a
// check that reads a flipped byte: the joined serve, whose own bytes are
// intact, is refused as corrupt, which a serve that hashed for itself
// would not be; the next serve, with no check running, hashes the file
// and succeeds.
func TestAServeJoinsTheRunningCheck(t *testing.T) {
	b, disk, release, served := serveJoiningAHeldCheck(t)
	release()
	wantCode(t, <-served, codes.FailedPrecondition)
	mustDownload(t, b.client, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)
}

// serveJoiningAHeldCheck uploads an image "img" through replica A and
// returns once a download of its disk from B has joined B's background
// check of the blob, which reads flipped bytes and is held at its first
// read until release (called at the latest when the test ends). served
// gets the download's result; a success with other bytes than the blob's
// fails the test.
func serveJoiningAHeldCheck(t *testing.T) (b *env, disk []byte, release func(), served <-chan error) {
	t.Helper()
	a, b := replicas(t)
	reading, held := make(chan struct{}), make(chan struct{})
	var once, released sync.Once
	release = func() { released.Do(func() { close(held) }) }
	// Registered after the replicas' own cleanups, so it runs before
	// them: a failed test must not leave B's check blocked in Close.
	t.Cleanup(release)
	read := func(r io.Reader) io.Reader {
		return &flippingReader{r: r, first: func() {
			once.Do(func() { close(reading) })
			<-held
		}}
	}
	b.svc.checkRead.Store(&read)
	disk = randomBytes(t, 3<<20+512)
	if _, err := uploadImage(context.Background(), a.client, &minicloudv1.CreateImageHeader{Name: "img"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-reading:
	case <-time.After(30 * time.Second):
		t.Fatal("B did not check the new blob")
	}
	result := make(chan error, 1)
	go func() {
		got, err := download(t, b.client, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
		if err == nil && digest(got) != digest(disk) {
			t.Error("the served bytes are not the blob's")
		}
		result <- err
	}()
	deadline := time.Now().Add(30 * time.Second)
	for b.svc.checks.joiners(digest(disk)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the serve did not join the running check")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return b, disk, release, result
}

// flippingReader calls first before its first read, and flips a bit of
// what it reads.
type flippingReader struct {
	r       io.Reader
	first   func()
	started bool
}

func (f *flippingReader) Read(p []byte) (int, error) {
	if !f.started {
		f.started = true
		f.first()
	}
	n, err := f.r.Read(p)
	if n > 0 {
		p[0] ^= 1
	}
	return n, err
}

// TestACheckEndingWithoutAVerdictLeavesTheServeToHashItself: a serve that
// joined a check which then stops (the replica closing) before reading the
// whole blob does not take that as a verdict: it hashes the file itself.
// The check reads flipped bytes, the file is intact: the serve succeeds
// only if it hashed the file.
func TestACheckEndingWithoutAVerdictLeavesTheServeToHashItself(t *testing.T) {
	b, _, release, served := serveJoiningAHeldCheck(t)
	// The replica's background work stops: the check ends at its next
	// read, without a verdict.
	b.svc.cancelBackground()
	release()
	if err := <-served; err != nil {
		t.Fatalf("a serve whose check ended without a verdict: %v", err)
	}
}

// TestACheckWaitsForAServeHashingTheBlob: a background check that comes
// due while a serve is hashing the same blob itself (a fetch begun within
// the guard, as a new image's first VM's is) waits for that serve instead
// of reading the blob a second time beside it, then checks it.
func TestACheckWaitsForAServeHashingTheBlob(t *testing.T) {
	a, b := replicas(t)
	ctx := context.Background()
	disk := randomBytes(t, 8<<20)
	if _, err := uploadImage(ctx, a.client, &minicloudv1.CreateImageHeader{Name: "img"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	// A serve begun at once, held after its first message: flow control
	// keeps it in DownloadImage.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := b.client.DownloadImage(sctx, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for b.svc.checks.deferrals() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the check did not wait for the serve hashing the blob")
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := append([]byte(nil), first.GetData()...)
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, msg.GetData()...)
	}
	if digest(got) != digest(disk) {
		t.Fatal("the served bytes are not the blob's")
	}
	waitRemembered(t, b, digest(disk), filepath.Join(b.dir, digest(disk)))
}

// TestABlobChangedWhileServedOnTheMemoIsRefused: a serve that does not
// hash (the memo holds the file) still refuses to end with OK when the
// file changed while it was being served: the memo's verdict covered the
// file as it was.
func TestABlobChangedWhileServedOnTheMemoIsRefused(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	disk := randomBytes(t, 8<<20)
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "img"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(e.dir, digest(disk))
	waitRemembered(t, e, digest(disk), blob)
	// Held after its first message: flow control keeps it in
	// DownloadImage while the file changes.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := e.client.DownloadImage(sctx, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(blob, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{disk[len(disk)-1] ^ 0xff}, int64(len(disk)-1)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// The change time moved for certain, whatever the clock's tick.
	later := time.Now().Add(time.Second)
	if err := os.Chtimes(blob, later, later); err != nil {
		t.Fatal(err)
	}
	for {
		_, err = stream.Recv()
		if err != nil {
			break
		}
	}
	wantCode(t, err, codes.FailedPrecondition)
	if e.svc.verified.verified(digest(disk), stat(t, blob)) {
		t.Fatal("a blob changed while served stayed remembered")
	}
}
