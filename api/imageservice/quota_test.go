package imageservice

import (
	"context"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

const mib = 1 << 20

func (e *env) setImageQuota(t *testing.T, project string, bytes int64) {
	t.Helper()
	v, err := store.Marshal(&minicloudv1.QuotaLimits{ImageBytes: &bytes})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.etcd.Put(context.Background(), store.QuotaLimitsKey(project), v); err != nil {
		t.Fatal(err)
	}
}

func (e *env) imageBytesUsed(t *testing.T, project string) int64 {
	t.Helper()
	u, err := store.ReadUsage(context.Background(), e.etcd, project)
	if err != nil {
		t.Fatal(err)
	}
	return u.Usage.GetImageBytes()
}

// wantOnlyBlobs fails unless the image directory holds exactly the blobs
// of these bytes: no temporary file, nothing of a refused upload.
func (e *env) wantOnlyBlobs(t *testing.T, blobs ...[]byte) {
	t.Helper()
	want := map[string]bool{}
	for _, b := range blobs {
		want[digest(b)] = true
	}
	files := e.dirFiles(t)
	for _, f := range files {
		if !want[f] {
			t.Fatalf("image directory holds %s (files %v)", f, files)
		}
	}
	if len(files) != len(want) {
		t.Fatalf("image directory holds %v, want %d blobs", files, len(want))
	}
}

// TestUploadStopsAtQuota: an upload streams against its project's
// image_bytes and is refused (RESOURCE_EXHAUSTED) at the chunk that would
// exceed it, leaving nothing on disk; a declared size over the quota is
// refused before any byte; a delete gives the bytes back once.
func TestUploadStopsAtQuota(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	e.setImageQuota(t, "p", 3*mib)
	a := randomBytes(t, 2*mib)
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "a", Project: "p"}, parts{disk: a}); err != nil {
		t.Fatal(err)
	}
	<-e.createDone
	if got := e.imageBytesUsed(t, "p"); got != 2*mib {
		t.Fatalf("usage %d bytes, want %d", got, 2*mib)
	}

	// Undeclared size: refused mid-stream, at the chunk past the quota.
	b := randomBytes(t, 2*mib)
	_, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "b", Project: "p"}, parts{disk: b})
	wantCode(t, err, codes.ResourceExhausted)
	if !strings.Contains(err.Error(), "image_bytes: asked") || !strings.Contains(err.Error(), "used 2097152, allowed 3145728") {
		t.Fatalf("refusal %q does not say what was asked, used and allowed", err)
	}
	if err := <-e.createDone; err == nil {
		t.Fatal("refused upload's handler succeeded")
	}
	e.wantOnlyBlobs(t, a)

	// Declared size: refused before the bytes.
	_, err = uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "b", Project: "p", DiskSizeBytes: int64(len(b))}, parts{disk: b})
	wantCode(t, err, codes.ResourceExhausted)
	<-e.createDone
	e.wantOnlyBlobs(t, a)
	if got := e.imageBytesUsed(t, "p"); got != 2*mib {
		t.Fatalf("usage %d bytes after refusals, want %d", got, 2*mib)
	}

	// Another project has its own room.
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "q", Project: "q"}, parts{disk: b}); err != nil {
		t.Fatal(err)
	}
	<-e.createDone

	// A delete gives the bytes back, once.
	if _, err := e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "a", Project: "p"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "a", Project: "p"})
	wantCode(t, err, codes.NotFound)
	if got := e.imageBytesUsed(t, "p"); got != 0 {
		t.Fatalf("usage %d bytes after the delete, want 0", got)
	}
	if _, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "b", Project: "p"}, parts{disk: b}); err != nil {
		t.Fatal(err)
	}
	<-e.createDone
	if got := e.imageBytesUsed(t, "p"); got != 2*mib {
		t.Fatalf("usage %d bytes, want %d", got, 2*mib)
	}
}

// TestConcurrentUploadsShareQuota: two uploads that each fit alone but
// not together, to two replicas at once: both stream (each saw room when
// it began), the commit transaction lets exactly one in, and the other's
// blob is removed.
func TestConcurrentUploadsShareQuota(t *testing.T) {
	e := newEnv(t, 0)
	e2 := newEnvOn(t, e.etcd, e.dir, 0)
	e.setImageQuota(t, "p", 3*mib)
	data := [][]byte{randomBytes(t, 2*mib), randomBytes(t, 2*mib)}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, env := range []*env{e, e2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = uploadImage(context.Background(), env.client, &minicloudv1.CreateImageHeader{Name: []string{"x", "y"}[i], Project: "p"}, parts{disk: data[i]})
		}()
	}
	wg.Wait()
	<-e.createDone
	<-e2.createDone
	var ok []int
	for i, err := range errs {
		if err == nil {
			ok = append(ok, i)
		} else {
			wantCode(t, err, codes.ResourceExhausted)
		}
	}
	if len(ok) != 1 {
		t.Fatalf("%d uploads succeeded (%v), want 1", len(ok), errs)
	}
	e.wantOnlyBlobs(t, data[ok[0]])
	if got := e.imageBytesUsed(t, "p"); got != 2*mib {
		t.Fatalf("usage %d bytes, want %d", got, 2*mib)
	}
}

// TestImageVisibility: another project's private image is NOT_FOUND for
// every call; a public one is seen by all but changed only by its owner;
// hosts (and calls with no principal and no project) see every image.
func TestImageVisibility(t *testing.T) {
	e := newEnv(t, 0)
	ctx := context.Background()
	disk := randomBytes(t, 64<<10)
	img, err := uploadImage(ctx, e.client, &minicloudv1.CreateImageHeader{Name: "priv", Project: "p1"}, parts{disk: disk})
	if err != nil {
		t.Fatal(err)
	}
	<-e.createDone
	if img.GetMeta().GetProject() != "p1" || img.GetVisibility() != minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE {
		t.Fatalf("uploaded image: owner %q visibility %v", img.GetMeta().GetProject(), img.GetVisibility())
	}
	// An image from before owners: everyone's.
	legacy, _ := store.Marshal(&minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Id: "l", Name: "legacy"}, Disk: &minicloudv1.ImageBlob{Sha256: digest(disk), SizeBytes: int64(len(disk))}})
	if _, err := e.etcd.Put(ctx, store.ImageKey("legacy"), legacy); err != nil {
		t.Fatal(err)
	}
	names := func(project string) string {
		t.Helper()
		l, err := e.client.ListImages(ctx, &minicloudv1.ListImagesRequest{Project: project})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, i := range l.GetImages() {
			out = append(out, i.GetMeta().GetName())
		}
		return strings.Join(out, ",")
	}
	downloadAs := func(project string) error {
		_, err := download(t, e.client, &minicloudv1.DownloadImageRequest{Name: "priv", Project: project, Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
		return err
	}

	// p2 cannot tell priv from a missing image.
	_, err = e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "priv", Project: "p2"})
	wantCode(t, err, codes.NotFound)
	wantCode(t, downloadAs("p2"), codes.NotFound)
	_, err = e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "priv", Project: "p2"})
	wantCode(t, err, codes.NotFound)
	_, err = e.client.SetImageVisibility(ctx, &minicloudv1.SetImageVisibilityRequest{Name: "priv", Project: "p2", Visibility: minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC})
	wantCode(t, err, codes.NotFound)
	if got := names("p2"); got != "legacy" {
		t.Fatalf("p2 lists %q", got)
	}
	if got := names("p1"); got != "legacy,priv" {
		t.Fatalf("p1 lists %q", got)
	}
	if err := downloadAs("p1"); err != nil {
		t.Fatal(err)
	}
	// A host fetches whatever its VMs need, whatever project it names.
	host := auth.NewContext(ctx, &auth.Principal{Kind: auth.KindHost, Name: "h1"})
	if _, err := e.svc.GetImage(host, &minicloudv1.GetImageRequest{Name: "priv", Project: "p2"}); err != nil {
		t.Fatalf("host: %v", err)
	}
	user := auth.NewContext(ctx, &auth.Principal{Kind: auth.KindUser, Name: "bob", Projects: map[string]auth.Role{"p2": auth.RoleMember}})
	if _, err := e.svc.GetImage(user, &minicloudv1.GetImageRequest{Name: "priv", Project: "p2"}); err == nil {
		t.Fatal("a user of p2 sees p1's private image")
	}
	// No principal, no project (the plaintext all-in-one's agent): all.
	if _, err := e.client.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "priv"}); err != nil {
		t.Fatal(err)
	}

	// Made public: p2 sees it and fetches it, but cannot change it.
	pub, err := e.client.SetImageVisibility(ctx, &minicloudv1.SetImageVisibilityRequest{Name: "priv", Project: "p1", Visibility: minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC})
	if err != nil || pub.GetVisibility() != minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC || pub.GetMeta().GetResourceVersion() <= img.GetMeta().GetResourceVersion() {
		t.Fatalf("SetImageVisibility = %v, %v", pub, err)
	}
	if got := names("p2"); got != "legacy,priv" {
		t.Fatalf("p2 lists %q after publication", got)
	}
	if err := downloadAs("p2"); err != nil {
		t.Fatal(err)
	}
	_, err = e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "priv", Project: "p2"})
	wantCode(t, err, codes.PermissionDenied)
	_, err = e.client.SetImageVisibility(ctx, &minicloudv1.SetImageVisibilityRequest{Name: "priv", Project: "p2", Visibility: minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE})
	wantCode(t, err, codes.PermissionDenied)
	_, err = e.client.SetImageVisibility(ctx, &minicloudv1.SetImageVisibilityRequest{Name: "legacy", Project: "p1", Visibility: minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE})
	wantCode(t, err, codes.PermissionDenied)
	_, err = e.client.SetImageVisibility(ctx, &minicloudv1.SetImageVisibilityRequest{Name: "priv", Project: "p1"})
	wantCode(t, err, codes.InvalidArgument)
	// Private again: gone for p2.
	if _, err := e.client.SetImageVisibility(ctx, &minicloudv1.SetImageVisibilityRequest{Name: "priv", Project: "p1", Visibility: minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE}); err != nil {
		t.Fatal(err)
	}
	wantCode(t, downloadAs("p2"), codes.NotFound)
	if _, err := e.client.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: "priv", Project: "p1"}); err != nil {
		t.Fatal(err)
	}
}
