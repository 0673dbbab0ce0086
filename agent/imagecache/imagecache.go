// Package imagecache keeps image parts (disk, kernel, initrd) on a
// hypervisor host, addressed by sha256. A part is downloaded once from the
// API's ImageService, verified against its digest while it streams into a
// temporary file, and renamed into place only when the digest matches, so
// a file at Path(digest) is always complete and correct. VM disks are qcow2
// overlays backed by these files (agent/disk); the cache never hands out a
// copy.
package imagecache

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"google.golang.org/grpc"

	"github.com/minicloud/minicloud/agent/qemuaccess"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// ErrDigestMismatch is wrapped by Ensure when the downloaded bytes do not
// hash to the requested digest (corrupt transfer, or the image changed).
var ErrDigestMismatch = errors.New("downloaded image does not match its sha256")

// tmpPrefix names downloads in progress; GC removes stale ones.
const tmpPrefix = ".download-"

// Cache is a directory of verified image parts. It is safe for concurrent
// use; concurrent Ensure calls for one digest download it once.
type Cache struct {
	dir    string
	client minicloudv1.ImageServiceClient
	qemu   qemuaccess.Access
	log    *slog.Logger

	mu       sync.Mutex
	inflight map[string]*download
}

type download struct {
	done chan struct{}
	err  error
}

// New returns a cache in dir, creating it. QEMU, running as an unprivileged
// user, reads cached images as the backing files, kernels and initrds of
// VMs, so the directory and the images are opened to qemu (its group), and
// to no one else: an image may be a project's private one.
func New(dir string, client minicloudv1.ImageServiceClient, qemu qemuaccess.Access) (*Cache, error) {
	if !filepath.IsAbs(dir) {
		return nil, errdefs.Invalid("image cache dir %q must be absolute", dir)
	}
	if err := qemu.MkdirAll(dir); err != nil {
		return nil, fmt.Errorf("create image cache %s: %w", dir, err)
	}
	return &Cache{dir: dir, client: client, qemu: qemu, log: slog.Default().With("component", "imagecache"), inflight: map[string]*download{}}, nil
}

// Dir is the cache directory.
func (c *Cache) Dir() string { return c.dir }

// Path is where the part with this digest lives once cached. It does not
// check that it is there (see Has).
func (c *Cache) Path(digest string) string { return filepath.Join(c.dir, digest) }

// Has reports whether digest is cached.
func (c *Cache) Has(digest string) bool {
	if validDigest(digest) != nil {
		return false
	}
	st, err := os.Stat(c.Path(digest))
	return err == nil && st.Mode().IsRegular()
}

// Ensure returns the path of the part of image with the given digest,
// downloading and verifying it first if it is not cached yet. Concurrent
// calls for one digest share one download; a caller whose ctx ends stops
// waiting without cancelling the others. A corrupt download fails with an
// error wrapping ErrDigestMismatch and leaves nothing behind.
func (c *Cache) Ensure(ctx context.Context, image string, part minicloudv1.ImagePart, digest string) (string, error) {
	if err := validDigest(digest); err != nil {
		return "", err
	}
	path := c.Path(digest)
	for {
		if c.Has(digest) {
			return path, nil
		}
		c.mu.Lock()
		dl, running := c.inflight[digest]
		if !running {
			dl = &download{done: make(chan struct{})}
			c.inflight[digest] = dl
		}
		c.mu.Unlock()

		if !running {
			dl.err = c.fetch(ctx, image, part, digest)
			c.mu.Lock()
			delete(c.inflight, digest)
			c.mu.Unlock()
			close(dl.done)
			if dl.err != nil {
				return "", dl.err
			}
			return path, nil
		}
		select {
		case <-dl.done:
		case <-ctx.Done():
			return "", errdefs.Wrap(errdefs.KindUnavailable, ctx.Err(), "wait for download of image %s %s", image, digest)
		}
		if dl.err == nil {
			return path, nil
		}
		// The leader failed; if only because its own context ended, this
		// caller (whose context is alive) tries itself.
		if !errors.Is(dl.err, context.Canceled) && !errors.Is(dl.err, context.DeadlineExceeded) {
			return "", dl.err
		}
	}
}

func (c *Cache) fetch(ctx context.Context, image string, part minicloudv1.ImagePart, digest string) (err error) {
	what := fmt.Sprintf("image %q %s %s", image, partName(part), digest)
	tmp, direct, err := createTemp(c.dir, tmpPrefix+digest+"-")
	if err != nil {
		return fmt.Errorf("download %s: %w", what, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()

	// The receive, the hash and the write each run on a goroutine of their
	// own (see sink), so on a host with a spare core they overlap instead
	// of adding up; the codec puts each message's data into the sink.
	out := newSink(tmp, direct)
	defer func() {
		if _, _, cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("download %s: %w", what, cerr)
		}
	}()
	stream, err := c.client.DownloadImage(ctx, &minicloudv1.DownloadImageRequest{Name: image, Part: part, Sha256: digest}, grpc.ForceCodecV2(newSinkCodec(out)))
	if err != nil {
		return fmt.Errorf("download %s: %w", what, errdefs.FromGRPC(err))
	}
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if werr := out.failed(); werr != nil {
			// The codec's write failed (a full disk, say): that, not the
			// Internal status gRPC made of it, is the reason.
			return fmt.Errorf("download %s: %w", what, werr)
		}
		if err != nil {
			// Stream errors arrive as gRPC statuses; map them back to
			// errdefs kinds so NotFound stays NotFound.
			return fmt.Errorf("download %s after %d bytes: %w", what, out.n, errdefs.FromGRPC(err))
		}
	}
	sum, n, err := out.Close()
	if err != nil {
		return fmt.Errorf("download %s: %w", what, err)
	}
	if got := hex.EncodeToString(sum); got != digest {
		return errdefs.Wrap(errdefs.KindFailedPrecondition, ErrDigestMismatch, "download %s: got %d bytes with sha256 %s", what, n, got)
	}
	if err := c.qemu.ShareFile(tmp.Name()); err != nil {
		return fmt.Errorf("download %s: %w", what, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("download %s: sync: %w", what, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("download %s: close: %w", what, err)
	}
	if err := os.Rename(tmp.Name(), c.Path(digest)); err != nil {
		return fmt.Errorf("download %s: %w", what, err)
	}
	if d, err := os.Open(c.dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	c.log.Info("cached image part", "image", image, "part", partName(part), "sha256", digest, "bytes", n)
	return nil
}

// List returns the cached digests.
func (c *Cache) List() ([]string, error) {
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, fmt.Errorf("list image cache %s: %w", c.dir, err)
	}
	var out []string
	for _, e := range ents {
		if e.Type().IsRegular() && validDigest(e.Name()) == nil {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// GC removes every cached digest for which keep returns false, and the
// debris of interrupted downloads. keep must return true for every digest
// some VM disk is backed by (disk.Inspect(...).BackingFile) and every digest
// a VM on this host may still need. It returns the digests it removed.
func (c *Cache) GC(keep func(digest string) bool) ([]string, error) {
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, fmt.Errorf("gc image cache %s: %w", c.dir, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock() // no download starts or finishes while we sweep
	var removed []string
	for _, e := range ents {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, tmpPrefix):
			digest, _, _ := strings.Cut(strings.TrimPrefix(name, tmpPrefix), "-")
			if _, running := c.inflight[digest]; running {
				continue
			}
		case validDigest(name) == nil:
			if keep(name) {
				continue
			}
			if _, running := c.inflight[name]; running {
				continue
			}
			removed = append(removed, name)
		default:
			continue // not ours
		}
		if err := os.Remove(filepath.Join(c.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, fmt.Errorf("gc image cache: %w", err)
		}
	}
	return removed, nil
}

func validDigest(d string) error {
	if len(d) != 64 || strings.ToLower(d) != d {
		return errdefs.Invalid("image digest %q is not a lower-case hex sha256", d)
	}
	if _, err := hex.DecodeString(d); err != nil {
		return errdefs.Invalid("image digest %q is not a lower-case hex sha256", d)
	}
	return nil
}

// partName is "disk", "kernel" or "initrd" for log and error messages.
func partName(p minicloudv1.ImagePart) string {
	return strings.ToLower(strings.TrimPrefix(p.String(), "IMAGE_PART_"))
}
