package server

import (
	"context"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// SetVMHistory sets how many changes the VM watch cache of servers
// started from now on keeps, and returns a function that restores it.
func SetVMHistory(n int) (restore func()) {
	old := vmHistory
	vmHistory = n
	return func() { vmHistory = old }
}

// SetCredTiming sets the credentials cache's heartbeat and staleness bound
// for servers started from now on, and returns a function that restores
// them.
func SetCredTiming(heartbeat, staleAfter time.Duration) (restore func()) {
	oldH, oldS := credHeartbeat, credStaleAfter
	credHeartbeat, credStaleAfter = heartbeat, staleAfter
	return func() { credHeartbeat, credStaleAfter = oldH, oldS }
}

// CredCacheHits is how many calls s's credentials cache answered.
func (s *Server) CredCacheHits() int64 { return s.creds.hits.Load() }

// CredCacheCurrent says whether s's credentials cache would answer now.
func (s *Server) CredCacheCurrent() bool {
	s.creds.mu.RLock()
	defer s.creds.mu.RUnlock()
	return s.creds.current()
}

// SetStallableWatches makes the credentials and create caches of servers
// started from now on watch through a watcher that StallCredWatch and
// StallCreateCacheWatch can silence, and returns a function that restores
// the plain one.
func SetStallableWatches() (restore func()) {
	old := wrapCacheWatcher
	wrapCacheWatcher = func(w clientv3.Watcher) clientv3.Watcher { return &stallWatcher{Watcher: w} }
	return func() { wrapCacheWatcher = old }
}

// StallCredWatch makes s's credentials cache hear nothing from its
// watches (no events, no progress answers), as a watch that went silent
// without breaking; resume undoes it. s must have been started after
// SetStallableWatches.
func (s *Server) StallCredWatch() (resume func()) {
	w := s.creds.watcher.(*stallWatcher)
	w.gate.Lock()
	return w.gate.Unlock
}

// StallCreateCacheWatch is StallCredWatch for s's create cache.
func (s *Server) StallCreateCacheWatch() (resume func()) {
	w := s.createCache.watcher.(*stallWatcher)
	w.gate.Lock()
	return w.gate.Unlock
}

// CreateCacheSynced says whether s's create cache answers creates.
func (s *Server) CreateCacheSynced() bool {
	s.createCache.mu.RLock()
	defer s.createCache.mu.RUnlock()
	return s.createCache.synced
}

// CreateCacheHits is how many creates s's create cache answered.
func (s *Server) CreateCacheHits() int64 { return s.createCache.hits.Load() }

// stallWatcher passes a watcher's answers on, except while gate is held.
type stallWatcher struct {
	clientv3.Watcher
	gate sync.Mutex
}

func (w *stallWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	in := w.Watcher.Watch(ctx, key, opts...)
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		for resp := range in {
			w.gate.Lock()
			w.gate.Unlock() //nolint:staticcheck // an empty critical section: waits while the test holds the gate
			select {
			case out <- resp:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}
