package imageservice

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func stat(t *testing.T, path string) fileID {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	id, err := identify(f)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestVerifiedBlobsTrustOnlyTheSameOldFile: a verification is remembered
// only for the file version it read (inode, size, timestamps), only if
// that version was older than VerifiedGuard when it began (a later write
// in the same clock tick would change no timestamp), and for at most
// verifiedMaxAge.
func TestVerifiedBlobsTrustOnlyTheSameOldFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(path, []byte("intact"), 0o600); err != nil {
		t.Fatal(err)
	}
	id := stat(t, path)
	changed := time.Unix(0, id.ctime)
	v := newVerifiedBlobs()

	v.remember("d", id, changed.Add(VerifiedGuard/2))
	if v.verified("d", id) {
		t.Fatal("a verification that began within the guard of the file's change was trusted")
	}
	began := changed.Add(VerifiedGuard)
	v.remember("d", id, began)
	v.now = func() time.Time { return began.Add(time.Minute) }
	if !v.verified("d", id) {
		t.Fatal("an unchanged verified file was not trusted")
	}
	if v.verified("other", id) {
		t.Fatal("a verification was trusted for another digest")
	}

	// Rewritten in place with the same size: the change time moves.
	time.Sleep(10 * time.Millisecond) // past one tick of the file system's clock
	if err := os.WriteFile(path, []byte("broken"), 0o600); err != nil {
		t.Fatal(err)
	}
	if v.verified("d", stat(t, path)) {
		t.Fatal("a file rewritten after its verification was trusted")
	}
	// The mismatch dropped the entry: not even the old identity is
	// trusted any more.
	if v.verified("d", id) {
		t.Fatal("an entry survived a mismatch")
	}

	v.remember("d", id, began)
	v.now = func() time.Time { return began.Add(verifiedMaxAge + time.Second) }
	if v.verified("d", id) {
		t.Fatal("a verification older than verifiedMaxAge was trusted")
	}

	v.now = time.Now
	v.remember("d", id, began)
	v.forget("d")
	if v.verified("d", id) {
		t.Fatal("a forgotten verification was trusted")
	}
}

// TestDownloadVerifiesAFileOnlyOnce: the first serve of a blob hashes it
// and remembers the result; a serve of the unchanged file does not hash it
// again (shown by a memo that lies: the API serves what it holds, and the
// agent's own check is what refuses it); a file changed since is hashed
// again and refused as corrupt.
func TestDownloadVerifiesAFileOnlyOnce(t *testing.T) {
	e := newEnv(t, 0)
	// This test holds the memo's clock; the check after the upload
	// would remember the blob on its own.
	e.svc.checkNewBlobs.Store(false)
	ctx := context.Background()
	disk := randomBytes(t, 3<<20+512)
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "img"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	// A serve that begins right after the blob's commit (the clock held
	// there) must not be remembered.
	req := &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK}
	blob := filepath.Join(e.dir, digest(disk))
	committed := time.Unix(0, stat(t, blob).ctime)
	e.svc.verified.now = func() time.Time { return committed }
	mustDownload(t, e.client, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)
	if e.svc.verified.verified(digest(disk), stat(t, blob)) {
		t.Fatal("a serve within the guard of the blob's commit was remembered")
	}

	// Later (the clock moved past the guard): the serve is remembered.
	e.svc.verified.now = func() time.Time { return time.Now().Add(2 * VerifiedGuard) }
	mustDownload(t, e.client, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)
	if !e.svc.verified.verified(digest(disk), stat(t, blob)) {
		t.Fatal("a verified serve of an old blob was not remembered")
	}
	mustDownload(t, e.client, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)

	// Corrupt in place: the file changed, so it is hashed and refused.
	bad := bytes.Clone(disk)
	bad[len(bad)/2] ^= 0xff
	if err := os.WriteFile(blob, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := download(t, e.client, req)
	wantCode(t, err, codes.FailedPrecondition)

	// A memo claiming the corrupt file intact is believed: the API does
	// not hash a file it remembers.
	e.svc.verified.remember(digest(disk), stat(t, blob), time.Now().Add(2*VerifiedGuard))
	got, err := download(t, e.client, req)
	if err != nil {
		t.Fatalf("download of a remembered file: %v", err)
	}
	if !bytes.Equal(got, bad) {
		t.Fatal("the served bytes are not the file's")
	}

	// A truncated file is refused even when remembered: the size check
	// does not depend on the memo.
	if err := os.WriteFile(blob, disk[:len(disk)-512], 0o600); err != nil {
		t.Fatal(err)
	}
	e.svc.verified.remember(digest(disk), stat(t, blob), time.Now().Add(2*VerifiedGuard))
	_, err = download(t, e.client, req)
	wantCode(t, err, codes.FailedPrecondition)
	if e.svc.verified.verified(digest(disk), stat(t, blob)) {
		t.Fatal("a blob of the wrong size stayed remembered")
	}
}

// TestUploadedBlobIsCheckedInTheBackground: a blob an upload committed is
// read and hashed once it is VerifiedGuard old and remembered, so the first
// download is served without the API's hash; a blob found corrupt by a
// check is not remembered, and its serve names the corruption.
func TestUploadedBlobIsCheckedInTheBackground(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	disk := randomBytes(t, 3<<20+512)
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "img"}, parts{disk: disk}); err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(e.dir, digest(disk))
	committed := stat(t, blob)
	if e.svc.verified.verified(digest(disk), committed) {
		t.Fatal("a blob was remembered within the guard of its commit")
	}
	waitRemembered(t, e, digest(disk), blob)
	mustDownload(t, e.client, "img", minicloudv1.ImagePart_IMAGE_PART_DISK, disk)

	// Corrupt after its commit: the check finds it and does not
	// remember it.
	e.svc.verified.forget(digest(disk))
	bad := bytes.Clone(disk)
	bad[len(bad)/2] ^= 0xff
	if err := os.WriteFile(blob, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	// Its modification time moved for certain, whatever the file system's
	// clock tick (a write within the same tick keeps mtime and ctime).
	later := time.Unix(0, committed.mtime).Add(time.Second)
	if err := os.Chtimes(blob, later, later); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.checkBlob(digest(disk)); err != nil {
		t.Fatal(err)
	}
	if e.svc.verified.verified(digest(disk), stat(t, blob)) {
		t.Fatal("a corrupt blob was remembered")
	}
	_, err := download(t, e.client, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	wantCode(t, err, codes.FailedPrecondition)
}

// waitRemembered waits until e's memo holds the blob file path as digest.
func waitRemembered(t *testing.T, e *env, digest, path string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if e.svc.verified.verified(digest, stat(t, path)) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("the blob was not remembered after a background check")
}
