package imageservice

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/pkg/wait"
)

// Background checks of new blobs.
//
// Every replica hashes each blob of an image that appears (on any replica:
// it watches the image records) once the blob is VerifiedGuard old, and
// remembers it (verifiedBlobs): a host's fetch of a new image, served by
// any replica, then finds the memo filled and is served without the API's
// sha256 in its path (~0.75 s of CPU per GiB, which on a busy machine is
// taken from the TLS, the socket and the agent's own hash). A fetch that
// arrives while the check of its blob runs joins it instead of hashing the
// blob a second time, and its status waits for the check's verdict: the
// API still declares a served blob good only once it has hashed that very
// file (docs/security.md, "Image integrity").
//
// Bounded: one check at a time per replica (the cores are the serves'
// too), at most maxQueuedChecks blobs waiting; a blob left out is hashed
// by its first serve here, as without the checks. Only images created
// while the replica runs are checked: at start, the blobs of the images
// already there are not read (an operator restarting a replica expects it
// to serve at once, not to read the whole store first, which may be far
// larger than the images anyone fetches soon); their first serve here
// verifies them, once per blob.

// maxQueuedChecks bounds the blobs waiting for a background check.
const maxQueuedChecks = 64

// checks is a replica's queue of background checks, the one running, and
// the serves hashing a blob themselves.
type checks struct {
	mu      sync.Mutex
	queue   []string // digests, oldest first
	queued  map[string]bool
	running *check
	// busy: the checker has taken a digest from the queue and not
	// finished with it (waiting for the guard, for serves, or hashing).
	busy    bool
	hashing map[string]*hashingServes // by digest
	wake    chan struct{}             // capacity 1: something was queued
	// deferred counts the checks that waited for serves hashing their
	// blob (for tests).
	deferred int
}

// check is one background check of a blob file.
type check struct {
	digest string
	id     fileID
	done   chan struct{} // closed with the verdict set
	// got is the digest of the file's bytes; "" if the check ended
	// without reading them all (stopped, or a read error).
	got string
	// joined counts the serves waiting for the verdict (for tests).
	joined int
}

// hashingServes are the serves of one blob hashing it themselves; idle is
// closed when the last one ends.
type hashingServes struct {
	n    int
	idle chan struct{}
}

func newChecks() *checks {
	return &checks{queued: map[string]bool{}, hashing: map[string]*hashingServes{}, wake: make(chan struct{}, 1)}
}

// add queues a check of digest unless it is queued already or the queue
// is full (then its first serve hashes it). It says whether it queued it.
func (c *checks) add(digest string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.queued[digest] || len(c.queue) >= maxQueuedChecks {
		return false
	}
	c.queued[digest] = true
	c.queue = append(c.queue, digest)
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return true
}

// next waits for the oldest queued digest; false once ctx is done.
func (c *checks) next(ctx context.Context) (string, bool) {
	for {
		c.mu.Lock()
		if len(c.queue) > 0 {
			d := c.queue[0]
			c.queue = c.queue[1:]
			delete(c.queued, d)
			c.busy = true
			c.mu.Unlock()
			return d, true
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return "", false
		case <-c.wake:
		}
	}
}

// taken says the checker is done with the digest next returned.
func (c *checks) taken() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy = false
}

// pending is the number of blobs queued or being checked.
func (c *checks) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := len(c.queue)
	if c.busy {
		n++
	}
	return n
}

// PendingChecks is the number of blobs of new images waiting for this
// replica's background check or being checked (the API server's
// minicloud_image_checks_pending).
func (s *Service) PendingChecks() int { return s.checks.pending() }

// serve is how DownloadImage, serving the file id of digest that the memo
// does not hold, learns who hashes it: the running check of that very
// file, which it joins (joined non-nil; its status waits for the verdict),
// or itself (joined nil; call end when the serve ends).
func (c *checks) serve(digest string, id fileID) (joined *check, end func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.running; r != nil && r.digest == digest && r.id == id {
		r.joined++
		return r, nil
	}
	h := c.hashing[digest]
	if h == nil {
		h = &hashingServes{idle: make(chan struct{})}
		c.hashing[digest] = h
	}
	h.n++
	return nil, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if h.n--; h.n == 0 {
			close(h.idle)
			delete(c.hashing, digest)
		}
	}
}

// start begins the check of the file id of digest, unless serves are
// hashing that blob themselves: then it returns what to wait for instead
// (the blob is not read twice at once, and a serve that began past the
// guard remembers it).
func (c *checks) start(digest string, id fileID) (*check, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if h := c.hashing[digest]; h != nil {
		c.deferred++
		return nil, h.idle
	}
	c.running = &check{digest: digest, id: id, done: make(chan struct{})}
	return c.running, nil
}

// finish records the verdict of the running check and wakes its joiners.
func (c *checks) finish(r *check, got string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r.got = got
	c.running = nil
	close(r.done)
}

// deferrals is how many checks waited for serves hashing their blob
// (tests).
func (c *checks) deferrals() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.deferred
}

// joiners is how many serves joined the running check of digest (tests).
func (c *checks) joiners(digest string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running == nil || c.running.digest != digest {
		return 0
	}
	return c.running.joined
}

// startChecks starts the replica's one checker and its watch of the image
// records from after revision rev (the images there at start are not
// checked).
func (s *Service) startChecks(rev int64) {
	s.background.Add(2)
	go func() {
		defer s.background.Done()
		for {
			digest, ok := s.checks.next(s.stopBackground)
			if !ok {
				return
			}
			if err := s.checkBlob(digest); err != nil {
				// Not fatal: the blob's first serve here checks it.
				s.log.Warn("background check of an image blob", "sha256", digest, "err", err)
			}
			s.checks.taken()
		}
	}()
	go func() {
		defer s.background.Done()
		s.watchNewImages(rev)
	}()
}

// queueCheck queues a background check of digest (a new blob).
func (s *Service) queueCheck(digest string) {
	if !s.checkNewBlobs.Load() {
		return
	}
	if !s.checks.add(digest) {
		s.log.Debug("background check of an image blob not queued (queued already, or the queue is full)", "sha256", digest)
	}
}

// watchNewImages queues the blobs of every image created after revision
// rev, on any replica, until the service stops. Events missed (the watch
// compacted away) leave those blobs to their first serve.
func (s *Service) watchNewImages(rev int64) {
	ctx := clientv3.WithRequireLeader(s.stopBackground)
	for ctx.Err() == nil {
		opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithFilterDelete()}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev+1))
		}
		for wr := range s.etcd.Watch(ctx, store.ImagePrefix, opts...) {
			if err := wr.Err(); err != nil {
				if wr.CompactRevision > 0 {
					rev = wr.CompactRevision - 1
				}
				if ctx.Err() == nil {
					s.log.Warn("watch of new images", "err", err)
				}
				break
			}
			rev = wr.Header.Revision
			for _, ev := range wr.Events {
				if !ev.IsCreate() {
					continue // images are never rewritten with other blobs
				}
				img, err := decodeImage(ev.Kv.Value, ev.Kv.ModRevision)
				if err != nil {
					s.log.Warn("watch of new images", "err", err)
					continue
				}
				for _, d := range blobDigests(img) {
					s.queueCheck(d)
				}
			}
		}
		wait.Sleep(ctx, time.Second) // before watching again
	}
}

// checkBlob hashes the blob digest once its last change is VerifiedGuard
// old, and remembers it if intact. A blob the memo holds is not read; one
// that serves are hashing themselves is read after them, if still needed.
func (s *Service) checkBlob(digest string) error {
	f, err := os.Open(s.blobs.path(digest))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // removed since (the image was deleted)
		}
		return err
	}
	defer f.Close()
	for {
		id, err := identify(f)
		if err != nil {
			return err
		}
		if s.verified.verified(digest, id) {
			return nil
		}
		// A check that began sooner could not be remembered; wait, and
		// look again (the file may have changed meanwhile).
		if d := time.Unix(0, max(id.ctime, id.mtime)).Add(VerifiedGuard + verifiedSlack).Sub(s.verified.now()); d > 0 {
			if !wait.Sleep(s.stopBackground, d) {
				return nil
			}
			continue
		}
		c, busy := s.checks.start(digest, id)
		if c == nil {
			select {
			case <-s.stopBackground.Done():
				return nil
			case <-busy:
			}
			continue
		}
		began := s.verified.now()
		got, err := hashFile(s.stopBackground, s.checkReader(f))
		if err != nil {
			s.checks.finish(c, "")
			if s.stopBackground.Err() != nil {
				return nil
			}
			return err
		}
		if got != digest {
			s.verified.forget(digest)
			s.log.Error("image blob is corrupt in the store", "sha256", digest, "got", got)
		} else {
			// Before the joiners wake: a serve after them finds it.
			s.verified.remember(digest, id, began)
		}
		s.checks.finish(c, got)
		return nil
	}
}

// checkReader is the reader a background check hashes: the file itself
// (tests put themselves in between).
func (s *Service) checkReader(f *os.File) io.Reader {
	if read := s.checkRead.Load(); read != nil {
		return (*read)(f)
	}
	return f
}

// hashFile is the hex sha256 of what r holds from where it is to its end.
func hashFile(ctx context.Context, r io.Reader) (string, error) {
	h := sha256.New()
	buf := chunkBuffers.Get(downloadChunkSize)
	defer chunkBuffers.Put(buf)
	if _, err := io.CopyBuffer(h, ctxReader{ctx, r}, *buf); err != nil {
		return "", fmt.Errorf("read blob: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// verifiedSlack is added to VerifiedGuard when waiting on the clock, so that
// the check that follows is past the guard by the memo's own measure.
const verifiedSlack = 100 * time.Millisecond

// ctxReader stops a long read (a GiB takes about a second) once ctx is
// done, so Close does not wait for it.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
