// Package imageservice is the server side of minicloudv1.ImageService.
//
// Image bytes (disk, kernel, initrd) are stored as content-addressed blobs in
// a directory named by their sha256; the metadata (minicloudv1.Image) lives
// in etcd at store.ImageKey(name). Uploads are untrusted: the disk format is
// detected from the bytes and images that refer to other files are refused
// (see package imageformat).
//
// The blob directory may be shared by every API replica of a cluster (a
// network file system; on one machine, one directory), so that the images
// survive the loss of the replica that took the upload. etcd coordinates
// the replicas: a mutex (store.ImageStoreLockPrefix) orders commits,
// deletes and garbage collection across them, and every upload in progress
// holds a key under its replica's lease (store.ImageUploadPrefix) that
// keeps any replica's garbage collection off its temporary file.
//
// Ordering keeps the two halves consistent across crashes: a blob is
// committed (renamed and synced) before the metadata that names it is
// written, and metadata is deleted before its blobs. A crash can therefore
// leave an unreferenced blob or temporary file, never metadata without a
// blob; CollectGarbage (run by New) removes such debris.
package imageservice

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/api/paging"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// DefaultMaxImageBytes bounds one upload (all parts together) when
// Config.MaxImageBytes is zero.
const DefaultMaxImageBytes int64 = 64 << 30

// DefaultMinFreeBytes is the free-space floor of the image store when
// Config.MinFreeBytes is zero.
const DefaultMinFreeBytes int64 = 256 << 20

// downloadChunkSize is the size of the data in each DownloadImage message.
const downloadChunkSize = 1 << 20

// cleanupTimeout bounds removing the blobs of a failed upload.
const cleanupTimeout = 30 * time.Second

// Config configures a Service.
type Config struct {
	Client *clientv3.Client
	// Dir is the blob directory. It may be shared by every API replica
	// using the same etcd (and only by them): at start the service deletes
	// files in it that no image references and no live upload owns.
	Dir string
	// ReplicaName identifies this replica in the keys of its uploads in
	// progress (for people reading etcd). Default: host name and pid.
	ReplicaName string
	// InUse returns the name of a VM that uses image, or "" if none does.
	// DeleteImage refuses to delete an image in use. Nil means never in use.
	InUse func(ctx context.Context, image string) (string, error)
	// MaxImageBytes bounds the total size of one upload; 0 means
	// DefaultMaxImageBytes.
	MaxImageBytes int64
	// MinFreeBytes is the free space an upload must leave on the image
	// store's file system: refused before the disk fills, not after; 0
	// means DefaultMinFreeBytes.
	MinFreeBytes int64
	// DefaultQuota is the quota of a project without overrides (an unset
	// limit, or nil: unlimited); an upload counts against its project's
	// image_bytes.
	DefaultQuota *minicloudv1.QuotaLimits
	// ProjectOf validates a request's project and names the default for
	// an empty one. Nil: an empty project is "default".
	ProjectOf func(string) (string, error)
	// PageTokens signs ListImages' page tokens (the API server's, so one
	// key serves every list). Nil: a key of this process.
	PageTokens *paging.Tokens
}

// Service implements minicloudv1.ImageServiceServer.
type Service struct {
	minicloudv1.UnimplementedImageServiceServer

	etcd  *clientv3.Client
	blobs blobDir
	// verified remembers the blob files DownloadImage or a background
	// check (checks.go) found intact.
	verified *verifiedBlobs
	// checks are the background checks of new blobs.
	checks   *checks
	inUse    func(ctx context.Context, image string) (string, error)
	maxBytes int64
	minFree  int64 // free-space floor of the blob directory (checkFree)
	log      *slog.Logger

	// checkNewBlobs: check new blobs in the background (tests that hold
	// the memo's clock turn it off).
	checkNewBlobs atomic.Bool
	// checkRead, if set, is what a background check reads instead of the
	// blob file (tests).
	checkRead atomic.Pointer[func(io.Reader) io.Reader]
	// background holds the background checks and the watch that queues
	// them; stopBackground ends them.
	background       sync.WaitGroup
	stopBackground   context.Context
	cancelBackground context.CancelFunc

	quotaDefaults *minicloudv1.QuotaLimits
	projectOf     func(string) (string, error)

	// commitMu orders "commit blobs, then write metadata" against "delete
	// metadata, then remove unreferenced blobs" inside this process, so a
	// blob is never removed between being committed and being referenced;
	// the etcd store lock (lockStore) does the same across replicas.
	commitMu sync.Mutex

	replica     *replica
	replicaName string
	// pages signs ListImages' page tokens.
	pages *paging.Tokens
}

var _ minicloudv1.ImageServiceServer = (*Service)(nil)

// New returns a Service. It creates cfg.Dir if needed and removes debris a
// crash may have left there (temporary uploads, unreferenced blobs); errors
// doing so are logged, not fatal, and retried by the next CollectGarbage.
func New(cfg Config) *Service {
	s := &Service{
		etcd:     cfg.Client,
		blobs:    blobDir{dir: cfg.Dir},
		verified: newVerifiedBlobs(),
		checks:   newChecks(),

		inUse:    cfg.InUse,
		maxBytes: cfg.MaxImageBytes,
		minFree:  cfg.MinFreeBytes,
		log:      slog.Default().With("component", "imageservice"),
		replica:  &replica{etcd: cfg.Client},

		quotaDefaults: cfg.DefaultQuota,
		projectOf:     cfg.ProjectOf,

		replicaName: cfg.ReplicaName,
		pages:       cfg.PageTokens,
	}
	s.stopBackground, s.cancelBackground = context.WithCancel(context.Background())
	s.checkNewBlobs.Store(true)
	if s.pages == nil {
		s.pages = paging.NewTokens(nil)
	}
	if s.replicaName == "" {
		host, _ := os.Hostname()
		s.replicaName = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	if s.maxBytes <= 0 {
		s.maxBytes = DefaultMaxImageBytes
	}
	if s.minFree <= 0 {
		s.minFree = DefaultMinFreeBytes
	}
	if s.projectOf == nil {
		s.projectOf = func(p string) (string, error) {
			if p == "" {
				return "default", nil
			}
			return p, nil
		}
	}
	if s.inUse == nil {
		s.inUse = func(context.Context, string) (string, error) { return "", nil }
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		s.log.Error("create image directory", "dir", cfg.Dir, "err", err)
		return s
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.CollectGarbage(ctx); err != nil {
		s.log.Warn("image garbage collection", "err", err)
	}
	// The images there now are not checked in the background (checks.go
	// says why); those created from here on are.
	var rev int64
	if resp, err := s.etcd.Get(ctx, store.ImagePrefix, clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil {
		s.log.Warn("images at start", "err", err)
	} else {
		rev = resp.Header.Revision
	}
	s.startChecks(rev)
	return s
}

// Close releases this replica's etcd session: its store lock and the keys
// of its uploads in progress go at once instead of when the lease expires.
// It stops the background checks of new blobs and waits for them.
func (s *Service) Close() {
	s.cancelBackground()
	s.background.Wait()
	s.replica.close()
}

// GetImage returns one image the caller's project may see.
func (s *Service) GetImage(ctx context.Context, req *minicloudv1.GetImageRequest) (*minicloudv1.Image, error) {
	if err := validateName(req.GetName()); err != nil {
		return nil, err
	}
	sc, err := s.scopeOf(ctx, req.GetProject())
	if err != nil {
		return nil, err
	}
	img, _, err := s.getVisible(ctx, sc, req.GetName())
	return img, err
}

// ListImages returns every image the caller's project may see, sorted by
// name.
func (s *Service) ListImages(ctx context.Context, req *minicloudv1.ListImagesRequest) (*minicloudv1.ListImagesResponse, error) {
	sc, err := s.scopeOf(ctx, req.GetProject())
	if err != nil {
		return nil, err
	}
	p, err := s.pages.Open("images", store.ImagePrefix, fmt.Sprintf("%t %q", sc.all, sc.project), req)
	if err != nil {
		return nil, err
	}
	resp := &minicloudv1.ListImagesResponse{}
	resp.NextPageToken, err = p.Scan(ctx, s.etcd, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) {
		n := 0
		for _, kv := range kvs {
			img, err := decodeImage(kv.Value, kv.ModRevision)
			if err != nil {
				return 0, err
			}
			if sc.sees(img) {
				resp.Images = append(resp.Images, img)
				n++
			}
		}
		return n, nil
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

// DeleteImage deletes an image that no VM uses, and its blobs once no other
// image shares them.
func (s *Service) DeleteImage(ctx context.Context, req *minicloudv1.DeleteImageRequest) (*minicloudv1.DeleteImageResponse, error) {
	name := req.GetName()
	if err := validateName(name); err != nil {
		return nil, err
	}
	sc, err := s.scopeOf(ctx, req.GetProject())
	if err != nil {
		return nil, err
	}
	lock, err := s.lockStore(ctx)
	if err != nil {
		return nil, err
	}
	defer lock.unlock()
	img, err := s.deleteUnused(ctx, lock, sc, name)
	if err != nil {
		return nil, err
	}
	if err := s.removeUnreferenced(ctx, lock, blobDigests(img)); err != nil {
		// The image is gone; a leaked blob is collected at the next start.
		s.log.Warn("remove blobs of deleted image", "image", name, "err", err)
	}
	return &minicloudv1.DeleteImageResponse{}, nil
}

// DownloadImage streams one part of an image in 1 MiB chunks.
func (s *Service) DownloadImage(req *minicloudv1.DownloadImageRequest, stream minicloudv1.ImageService_DownloadImageServer) error {
	ctx := stream.Context()
	name := req.GetName()
	if err := validateName(name); err != nil {
		return err
	}
	sc, err := s.scopeOf(ctx, req.GetProject())
	if err != nil {
		return err
	}
	img, _, err := s.getVisible(ctx, sc, name)
	if err != nil {
		return err
	}
	blob, err := partBlob(img, req.GetPart())
	if err != nil {
		return err
	}
	if want := req.GetSha256(); want != "" && !strings.EqualFold(want, blob.GetSha256()) {
		return errdefs.FailedPrecondition("image %q %s has sha256 %s, not the requested %s (the image was replaced?)",
			name, partName(req.GetPart()), blob.GetSha256(), want)
	}
	f, err := os.Open(s.blobs.path(blob.GetSha256()))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// Not permanent: the image exists, so its blob is in the
			// shared store; this replica cannot see it (store not
			// mounted, or a replica given its own directory). Another
			// replica, or this one once fixed, can serve it.
			s.log.Error("blob of an image is missing from this replica's image store; is the store shared by every API replica?", "image", name, "sha256", blob.GetSha256(), "dir", s.blobs.dir)
			return errdefs.Unavailable("image %q %s: blob %s is not in this API replica's image store; retry", name, partName(req.GetPart()), blob.GetSha256())
		}
		return fmt.Errorf("open blob %s: %w", blob.GetSha256(), err)
	}
	defer f.Close()
	// Every copy served is verified, unless this very file (same inode,
	// size and timestamps) was found intact before: the receiver checks
	// the digest too, so the API's check only names the store, not the
	// network, as the culprit, and need not cost a sha256 per serve. A
	// background check of this file that is running (checks.go) is joined
	// rather than done twice at once.
	id, err := identify(f)
	if err != nil {
		return err
	}
	began := s.verified.now()
	var h hash.Hash
	var joined *check
	if !s.verified.verified(blob.GetSha256(), id) {
		var end func()
		if joined, end = s.checks.serve(blob.GetSha256(), id); joined == nil {
			defer end()
			h = sha256.New()
		}
	}
	var sent int64
	for {
		// A buffer of its own for every chunk: gRPC may still be writing
		// the last one (see ServerCodec).
		buf := chunkBuffers.Get(downloadChunkSize)
		n, rerr := f.Read(*buf)
		*buf = (*buf)[:n]
		if n > 0 {
			if h != nil {
				h.Write(*buf)
			}
			ch := newBlobChunk(buf)
			err := stream.SendMsg(ch)
			ch.release()
			if err != nil {
				return err
			}
			sent += int64(n)
		} else {
			chunkBuffers.Put(buf)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				break
			}
			return fmt.Errorf("read blob %s: %w", blob.GetSha256(), rerr)
		}
	}
	if sent != blob.GetSizeBytes() {
		s.verified.forget(blob.GetSha256())
		return errdefs.FailedPrecondition("image %q %s: blob %s has %d bytes, metadata says %d", name, partName(req.GetPart()), blob.GetSha256(), sent, blob.GetSizeBytes())
	}
	if h == nil {
		// Served on another's verdict (the memo's, or a joined check's),
		// which covers the file as it was when the serve began: a change
		// while it was served is not covered.
		if now, err := identify(f); err != nil || now != id {
			s.verified.forget(blob.GetSha256())
			s.log.Error("image blob changed in the store while it was served", "image", name, "sha256", blob.GetSha256())
			return errdefs.FailedPrecondition("image %q %s: blob %s changed in the store while it was served", name, partName(req.GetPart()), blob.GetSha256())
		}
	}
	var got string
	switch {
	case h != nil:
		got = hex.EncodeToString(h.Sum(nil))
	case joined != nil:
		// The last byte is declared good only on the check's verdict.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-joined.done:
		}
		if got = joined.got; got == "" {
			// The check ended without one (stopped, or a read error):
			// the serve checks the file itself, as without the check.
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return fmt.Errorf("read blob %s: %w", blob.GetSha256(), err)
			}
			if got, err = hashFile(ctx, f); err != nil {
				return fmt.Errorf("blob %s: %w", blob.GetSha256(), err)
			}
		}
	default:
		return nil // remembered
	}
	if got != blob.GetSha256() {
		s.verified.forget(blob.GetSha256())
		s.log.Error("image blob is corrupt in the store", "image", name, "sha256", blob.GetSha256(), "got", got)
		return errdefs.FailedPrecondition("image %q %s: the stored blob is corrupt: its bytes have sha256 %s, not %s", name, partName(req.GetPart()), got, blob.GetSha256())
	}
	s.verified.remember(blob.GetSha256(), id, began)
	return nil
}

// deleteAttempts bounds how often DeleteImage retries when VMs change
// between its in-use check and its delete.
const deleteAttempts = 5

// deleteUnused deletes the image key if no VM uses the image. A VM created
// between the in-use check and the delete makes the transaction fail (no VM
// spec may change after the revision the check started from), and the
// check runs again. The caller holds lock.
func (s *Service) deleteUnused(ctx context.Context, lock *storeLock, sc scope, name string) (*minicloudv1.Image, error) {
	key := store.ImageKey(name)
	for range deleteAttempts {
		resp, err := s.etcd.Get(ctx, key)
		if err != nil {
			return nil, storeErr(err, "get image %s", name)
		}
		if len(resp.Kvs) == 0 {
			return nil, imageNotFound(name)
		}
		kv := resp.Kvs[0]
		img, err := decodeImage(kv.Value, kv.ModRevision)
		if err != nil {
			return nil, err
		}
		if err := sc.mayChange(img); err != nil {
			return nil, err
		}
		// InUse reads at or after this revision.
		checkedAt := resp.Header.Revision
		vm, err := s.inUse(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("check whether image %s is in use: %w", name, err)
		}
		if vm != "" {
			return nil, errdefs.FailedPrecondition("image %q is in use by VM %q; delete the VM first", name, vm)
		}
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision), store.UnchangedSince(store.VMSpecPrefix, checkedAt), lock.owned()}
		ops := []clientv3.Op{clientv3.OpDelete(key)}
		if owner := img.GetMeta().GetProject(); owner != "" {
			// The owner's quota gets the bytes back with the delete.
			qc, qo, err := store.ReadReleaseOps(ctx, s.etcd, owner, &minicloudv1.QuotaUsage{ImageBytes: store.ImageBytes(img)})
			if err != nil {
				return nil, err
			}
			cmps, ops = append(cmps, qc...), append(ops, qo...)
		}
		txn, err := s.etcd.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return nil, storeErr(err, "delete image %s", name)
		}
		if txn.Succeeded {
			return img, nil
		}
		if err := lock.held(); err != nil {
			return nil, err
		}
	}
	return nil, errdefs.Conflict("image %q: VMs kept changing while it was being deleted; retry", name)
}

// CollectGarbage removes temporary files no live upload (of any replica)
// owns and blobs no image references. New runs it; running it again at any
// time, on any replica, is safe.
func (s *Service) CollectGarbage(ctx context.Context) error {
	lock, err := s.lockStore(ctx)
	if err != nil {
		return err
	}
	defer lock.unlock()
	// The directory is read first: an upload registers its key before it
	// creates its file, so every file listed here that belongs to a live
	// upload has its key in the list read below.
	entries, err := os.ReadDir(s.blobs.dir)
	if err != nil {
		return fmt.Errorf("read image directory: %w", err)
	}
	refs, err := s.referenced(ctx)
	if err != nil {
		return err
	}
	active, err := s.activeUploads(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, tempPrefix):
			if _, ok := active[name]; ok {
				continue
			}
		case isBlobName(name):
			if _, ok := refs[name]; ok {
				continue
			}
		default:
			continue
		}
		if err := lock.held(); err != nil {
			return err
		}
		s.log.Info("removing unreferenced image file", "file", name)
		s.verified.forget(name)
		if err := os.Remove(s.blobs.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// get reads one image and the mod revision of its key.
func (s *Service) get(ctx context.Context, name string) (*minicloudv1.Image, int64, error) {
	resp, err := s.etcd.Get(ctx, store.ImageKey(name))
	if err != nil {
		return nil, 0, storeErr(err, "get image %s", name)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, errdefs.NotFound("image %q not found", name)
	}
	kv := resp.Kvs[0]
	img, err := decodeImage(kv.Value, kv.ModRevision)
	if err != nil {
		return nil, 0, err
	}
	return img, kv.ModRevision, nil
}

func (s *Service) list(ctx context.Context) ([]*minicloudv1.Image, error) {
	resp, err := s.etcd.Get(ctx, store.ImagePrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, storeErr(err, "list images")
	}
	imgs := make([]*minicloudv1.Image, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		img, err := decodeImage(kv.Value, kv.ModRevision)
		if err != nil {
			return nil, err
		}
		imgs = append(imgs, img)
	}
	return imgs, nil
}

// referenced returns the digests of every blob some image names.
func (s *Service) referenced(ctx context.Context) (map[string]struct{}, error) {
	imgs, err := s.list(ctx)
	if err != nil {
		return nil, err
	}
	refs := map[string]struct{}{}
	for _, img := range imgs {
		for _, d := range blobDigests(img) {
			refs[d] = struct{}{}
		}
	}
	return refs, nil
}

// removeUnreferenced removes those of digests that no image references.
// The caller holds lock.
func (s *Service) removeUnreferenced(ctx context.Context, lock *storeLock, digests []string) error {
	if len(digests) == 0 {
		return nil
	}
	refs, err := s.referenced(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range digests {
		if _, ok := refs[d]; ok {
			continue
		}
		if err := lock.held(); err != nil {
			return err
		}
		s.verified.forget(d)
		errs = append(errs, s.blobs.remove(d))
	}
	return errors.Join(errs...)
}

func decodeImage(b []byte, modRevision int64) (*minicloudv1.Image, error) {
	img := &minicloudv1.Image{}
	if err := proto.Unmarshal(b, img); err != nil {
		return nil, errdefs.Internal("decode stored image: %v", err)
	}
	if img.Meta == nil {
		img.Meta = &minicloudv1.ObjectMeta{}
	}
	img.Meta.ResourceVersion = modRevision
	return img, nil
}

func blobDigests(img *minicloudv1.Image) []string {
	var ds []string
	for _, b := range []*minicloudv1.ImageBlob{img.GetDisk(), img.GetKernel(), img.GetInitrd()} {
		if b.GetSha256() != "" {
			ds = append(ds, b.GetSha256())
		}
	}
	return ds
}

func partBlob(img *minicloudv1.Image, part minicloudv1.ImagePart) (*minicloudv1.ImageBlob, error) {
	var b *minicloudv1.ImageBlob
	switch part {
	case minicloudv1.ImagePart_IMAGE_PART_DISK:
		b = img.GetDisk()
	case minicloudv1.ImagePart_IMAGE_PART_KERNEL:
		b = img.GetKernel()
	case minicloudv1.ImagePart_IMAGE_PART_INITRD:
		b = img.GetInitrd()
	default:
		return nil, errdefs.Invalid("part must be disk, kernel or initrd")
	}
	if b.GetSha256() == "" {
		return nil, errdefs.NotFound("image %q has no %s", img.GetMeta().GetName(), partName(part))
	}
	return b, nil
}

func partName(p minicloudv1.ImagePart) string {
	switch p {
	case minicloudv1.ImagePart_IMAGE_PART_DISK:
		return "disk"
	case minicloudv1.ImagePart_IMAGE_PART_KERNEL:
		return "kernel"
	case minicloudv1.ImagePart_IMAGE_PART_INITRD:
		return "initrd"
	}
	return "unspecified part"
}

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

func validateName(name string) error {
	if name == "" {
		return errdefs.Invalid("image name is required")
	}
	if len(name) > 63 || !dnsLabel.MatchString(name) {
		return errdefs.Invalid("image name %q must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit", name)
	}
	return nil
}

// storeErr classifies an etcd error: a cancelled caller stays cancelled,
// anything else means the store is unreachable or failing.
func storeErr(err error, format string, args ...any) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf(format+": %w", append(args, err)...)
	}
	return errdefs.Wrap(errdefs.KindUnavailable, err, format, args...)
}
