package imageservice

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// sessionTTL is how long (seconds) a replica that died keeps the store lock
// and its uploads' keys before etcd expires its lease.
const sessionTTL = 10

// unlockTimeout bounds releasing the store lock.
const unlockTimeout = 5 * time.Second

// replica is this API replica's standing in etcd: a session (a lease kept
// alive while the process lives) that the store lock and the keys of its
// uploads in progress are attached to. If the session is lost (etcd
// unreachable for longer than the TTL) a new one is made on next use; what
// was attached to the old one is gone, so the uploads it covered fail.
type replica struct {
	etcd *clientv3.Client
	mu   sync.Mutex
	sess *concurrency.Session
}

func (r *replica) session(ctx context.Context) (*concurrency.Session, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sess != nil {
		select {
		case <-r.sess.Done():
			r.sess = nil
		default:
			return r.sess, nil
		}
	}
	// The lease is granted within the caller's deadline (etcd may be
	// unreachable); its keep-alive then runs for the life of the process.
	lease, err := r.etcd.Grant(ctx, sessionTTL)
	if err != nil {
		return nil, storeErr(err, "open image store session")
	}
	sess, err := concurrency.NewSession(r.etcd, concurrency.WithLease(lease.ID), concurrency.WithContext(context.WithoutCancel(ctx)))
	if err != nil {
		return nil, storeErr(err, "open image store session")
	}
	r.sess = sess
	return sess, nil
}

// close revokes the session, releasing at once what this replica held.
func (r *replica) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sess != nil {
		r.sess.Close()
		r.sess = nil
	}
}

// storeLock is held while committing, deleting or collecting blobs. The blob
// directory may be shared by every API replica (see docs/architecture.md,
// "Image blobs"), so "rename a blob, then write the image that names it" on
// one replica must not interleave with "list the referenced blobs, then
// remove the others" on another. Inside one process commitMu does the same
// (two holders of one etcd session would both "own" its mutex).
type storeLock struct {
	s     *Service
	sess  *concurrency.Session
	mutex *concurrency.Mutex
}

// lockStore takes commitMu and the etcd store lock.
func (s *Service) lockStore(ctx context.Context) (*storeLock, error) {
	s.commitMu.Lock()
	sess, err := s.replica.session(ctx)
	if err != nil {
		s.commitMu.Unlock()
		return nil, err
	}
	m := concurrency.NewMutex(sess, store.ImageStoreLockPrefix)
	if err := m.Lock(ctx); err != nil {
		s.commitMu.Unlock()
		return nil, storeErr(err, "lock the image store")
	}
	return &storeLock{s: s, sess: sess, mutex: m}, nil
}

// owned is the comparison that fences etcd writes made under the lock: it
// fails if the lock was lost (session expired) in the meantime.
func (l *storeLock) owned() clientv3.Cmp { return l.mutex.IsOwner() }

// held says whether the lock's session is still alive; file removals, which
// etcd cannot fence, check it first.
func (l *storeLock) held() error {
	select {
	case <-l.sess.Done():
		return errdefs.Unavailable("lost the image store lock (etcd session expired)")
	default:
		return nil
	}
}

func (l *storeLock) unlock() {
	ctx, cancel := context.WithTimeout(context.Background(), unlockTimeout)
	defer cancel()
	if err := l.mutex.Unlock(ctx); err != nil {
		// The key is attached to the session's lease: it goes when the
		// session does.
		l.s.log.Warn("unlock image store", "err", err)
	}
	l.s.commitMu.Unlock()
}

// registerUpload records, under this replica's lease, the name of a
// temporary file an upload is about to create, so garbage collection on
// any replica leaves it alone while this replica lives.
func (s *Service) registerUpload(ctx context.Context) (string, error) {
	sess, err := s.replica.session(ctx)
	if err != nil {
		return "", err
	}
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("upload name: %w", err)
	}
	name := tempPrefix + hex.EncodeToString(b[:])
	if _, err := s.etcd.Put(ctx, store.ImageUploadKey(name), s.replicaName, clientv3.WithLease(sess.Lease())); err != nil {
		return "", storeErr(err, "register upload")
	}
	return name, nil
}

// unregisterUpload drops an upload's key once its temporary file is gone
// (committed or removed). A failure only delays collection: the key dies
// with the session.
func (s *Service) unregisterUpload(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	if _, err := s.etcd.Delete(ctx, store.ImageUploadKey(name)); err != nil {
		s.log.Warn("unregister upload", "file", name, "err", err)
	}
}

// activeUploads returns the temporary file names of every replica's
// uploads in progress.
func (s *Service) activeUploads(ctx context.Context) (map[string]struct{}, error) {
	resp, err := s.etcd.Get(ctx, store.ImageUploadPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, storeErr(err, "list uploads in progress")
	}
	active := make(map[string]struct{}, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		active[string(kv.Key)[len(store.ImageUploadPrefix):]] = struct{}{}
	}
	return active, nil
}
