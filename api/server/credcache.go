package server

import (
	"context"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// The credentials cache: every call is authenticated, and reading the
// token and its user from etcd was one etcd round trip per call
// (docs/benchmarks.md, "API"). Instead each API server keeps every token,
// every user (with its role bindings) and the certificate deny-list in
// memory, kept current by an etcd watch, as the VM cache (watch.go) keeps
// the VMs.
//
// Only an "allowed" answer comes from the cache, and only while it is
// known current; every other case reads etcd as before:
//   - not synced: before the first list, after the watch broke (no leader,
//     compaction, etcd gone) and until it listed again;
//   - not heard from: no watch response (events or the progress answer the
//     cache asks for every credHeartbeat) for credStaleAfter; a watch that
//     stalls silently therefore cannot keep a revoked token alive longer;
//   - behind a write of this server: after a call of this server changed
//     credentials, until the watch has delivered that revision
//     (read-your-writes at one replica). Every handler that writes users,
//     tokens or the deny-list calls credCache.wrote after the write
//     (DeleteUser, GrantRole, RevokeRole, RevokeToken, RevokeHost, a
//     JoinHost that revoked earlier certificates);
//   - a miss (a token or user the cache does not hold, e.g. made a moment
//     ago at another replica): etcd decides, so a miss never refuses a
//     valid token and never allows an invalid one.
// Expiry is still checked on every call against the clock. A revocation at
// another replica thus takes effect here within the watch's latency
// (milliseconds), at most credStaleAfter if the watch stalls silently;
// docs/security.md ("Revocation") has the decision and its comparison.

// credHeartbeat is how often the cache asks etcd for a progress answer on
// its watch; credStaleAfter is how long without any answer the cache stops
// answering.
var (
	credHeartbeat  = 500 * time.Millisecond
	credStaleAfter = 2 * time.Second
)

// credEntry is a cached user: the user and its principal (built once per
// change of the user; calls copy it and set their token's id).
type credEntry struct {
	user      *minicloudv1.User
	principal *auth.Principal
}

type credCache struct {
	s *Server

	startOnce sync.Once

	mu     sync.RWMutex
	synced bool
	// rev is the revision both watches have reached (the lower of the
	// two); minRev is the revision this server's own credential writes
	// reached: the cache answers only once rev >= minRev.
	rev, minRev int64
	// epoch counts the writes whose revision is unknown (wrote): a list
	// begun before one of them must not be installed.
	epoch uint64
	// heard is when both watches last answered (the older of the two).
	heard   time.Time
	tokens  map[string]*minicloudv1.Token // by store.TokenKey
	users   map[string]*credEntry         // by user name
	revoked map[string]bool               // certificate serials
	// hits counts the calls the cache answered (tests read it).
	hits atomic.Int64
	// watcher is where the watches come from: the server's etcd client
	// (tests put one in front that can go silent, export_test.go).
	watcher clientv3.Watcher

	// poke asks the follower for a progress answer now (after a write);
	// relist makes it list again (a write whose revision is unknown).
	poke, relist chan struct{}
}

func newCredCache(s *Server) *credCache {
	c := &credCache{s: s, poke: make(chan struct{}, 1), relist: make(chan struct{}, 1)}
	c.watcher = cacheWatcher(s)
	return c
}

// wrapCacheWatcher, if set, wraps the watcher of the credentials and
// create caches made from then on (tests set it to make a watch that
// stops answering, export_test.go).
var wrapCacheWatcher func(clientv3.Watcher) clientv3.Watcher

// cacheWatcher is where a cache of s gets its watches.
func cacheWatcher(s *Server) clientv3.Watcher {
	if wrapCacheWatcher != nil {
		return wrapCacheWatcher(s.etcd)
	}
	return s.etcd
}

// start begins following etcd (once per server; the follower lists again
// by itself after a break).
func (c *credCache) start() {
	c.startOnce.Do(func() { go c.follow() })
}

// credsRange is the key range of users and tokens (store.TokenPrefix and
// store.UserPrefix are adjacent under auth/); isCredKey filters it.
var credsRange = [2]string{store.TokenPrefix, store.PrefixEnd(store.UserPrefix)}

// follow lists users, tokens and revoked serials, then applies the
// watches' changes, until the server stops; a break of either watch makes
// the cache unsynced and it lists again.
func (c *credCache) follow() {
	c.s.followEtcd("credentials cache", "calls read etcd", c.followOnce, func() {
		c.mu.Lock()
		c.synced = false
		c.mu.Unlock()
	})
}

// followEtcd runs once (a cache's list and watch) again and again until
// the server stops, calling unsynced after each break: the cache answers
// nothing until once has listed again. meanwhile says what callers do
// then (for the log).
func (s *Server) followEtcd(what, meanwhile string, once func(context.Context) error, unsynced func()) {
	ctx := s.streams
	for ctx.Err() == nil {
		err := once(ctx)
		unsynced()
		if ctx.Err() != nil || s.etcd.Ctx().Err() != nil {
			return // the server stopped, or its etcd client was closed
		}
		s.log.Warn(what+" stopped following etcd: "+meanwhile+" until it lists again", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// followOnce lists and watches until a watch breaks.
func (c *credCache) followOnce(ctx context.Context) error {
	c.mu.RLock()
	epoch := c.epoch
	c.mu.RUnlock()
	var reads store.Reads
	creds := reads.Get(credsRange[0], clientv3.WithRange(credsRange[1]))
	revoked := reads.Get(store.RevokedPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err := reads.Do(ctx, c.s.etcd); err != nil {
		return err
	}
	rev := reads.Revision()
	tokens, users, serials := map[string]*minicloudv1.Token{}, map[string]*credEntry{}, map[string]bool{}
	for _, kv := range creds.KVs() {
		if err := applyCred(tokens, users, mvccpb.PUT, kv); err != nil {
			return err
		}
	}
	for _, kv := range revoked.KVs() {
		serials[store.LastSegment(string(kv.Key))] = true
	}

	// One context for both watches: the client sends them on one gRPC
	// stream, and a progress request on it is answered to both. They start
	// at the list's revision, not after it: etcd answers a progress
	// request only once its revision has reached every watch's start, so
	// on a quiet cluster a watch from rev+1 would never hear one. The
	// changes at rev itself are in the list already; applying them again
	// changes nothing.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	credCh := c.watcher.Watch(wctx, credsRange[0], clientv3.WithRange(credsRange[1]), clientv3.WithRev(rev))
	revCh := c.watcher.Watch(wctx, store.RevokedPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev))

	c.mu.Lock()
	if c.epoch != epoch {
		c.mu.Unlock()
		return errdefs.Unavailable("a credential write's revision is unknown: list again")
	}
	if c.minRev == unknownRev {
		c.minRev = rev // this list began after that write
	}
	c.tokens, c.users, c.revoked = tokens, users, serials
	c.rev, c.heard, c.synced = rev, time.Now(), true
	c.mu.Unlock()

	// Each watch's own revision and last answer; the cache's are the
	// older of the two.
	watches := [2]followedWatch{{what: "users and tokens", rev: rev, heard: time.Now()}, {what: "revoked certificates", rev: rev, heard: time.Now()}}
	tick := time.NewTicker(credHeartbeat)
	defer tick.Stop()
	for {
		var (
			w    *followedWatch
			resp clientv3.WatchResponse
			ok   bool
		)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			c.requestProgress(wctx)
			continue
		case <-c.poke:
			c.requestProgress(wctx)
			continue
		case <-c.relist:
			return errdefs.Unavailable("a credential write's revision is unknown: list again")
		case resp, ok = <-credCh:
			w = &watches[0]
		case resp, ok = <-revCh:
			w = &watches[1]
		}
		if !ok {
			return errdefs.Unavailable("watch of %s ended", w.what)
		}
		if err := resp.Err(); err != nil {
			return err
		}
		w.rev, w.heard = max(w.rev, watchedRev(resp)), time.Now()
		if err := c.apply(resp.Events, min(watches[0].rev, watches[1].rev), minTime(watches[0].heard, watches[1].heard)); err != nil {
			return err
		}
	}
}

// followedWatch is where one of the cache's watches is.
type followedWatch struct {
	what  string
	rev   int64
	heard time.Time
}

// watchedRev is the revision up to which resp shows every change: its
// last event's, or the revision of a progress answer (0 for neither).
func watchedRev(resp clientv3.WatchResponse) int64 {
	if n := len(resp.Events); n > 0 {
		return resp.Events[n-1].Kv.ModRevision
	}
	if resp.IsProgressNotify() {
		return resp.Header.Revision
	}
	return 0
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// requestProgress asks etcd to answer the watches with its revision
// (answered when they have sent everything before it). A failure shows as
// silence, which credStaleAfter handles.
func (c *credCache) requestProgress(wctx context.Context) {
	ctx, cancel := context.WithTimeout(wctx, credHeartbeat)
	defer cancel()
	_ = c.watcher.RequestProgress(ctx)
}

// apply folds watch events into the cache and moves its revision and
// last-heard time.
func (c *credCache) apply(events []*clientv3.Event, rev int64, heard time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ev := range events {
		if strings.HasPrefix(string(ev.Kv.Key), store.RevokedPrefix) {
			serial := store.LastSegment(string(ev.Kv.Key))
			if ev.Type == mvccpb.DELETE {
				delete(c.revoked, serial)
			} else {
				c.revoked[serial] = true
			}
			continue
		}
		if err := applyCred(c.tokens, c.users, ev.Type, ev.Kv); err != nil {
			return err
		}
	}
	c.rev, c.heard = max(c.rev, rev), heard
	return nil
}

// applyCred puts (or deletes) one user or token key into the maps.
func applyCred(tokens map[string]*minicloudv1.Token, users map[string]*credEntry, typ mvccpb.Event_EventType, kv *mvccpb.KeyValue) error {
	key := string(kv.Key)
	switch {
	case strings.HasPrefix(key, store.TokenPrefix):
		if typ == mvccpb.DELETE {
			delete(tokens, key)
			return nil
		}
		tok := &minicloudv1.Token{}
		if err := store.Decode(kv, tok); err != nil {
			return err
		}
		tokens[key] = tok
	case strings.HasPrefix(key, store.UserPrefix):
		name := strings.TrimPrefix(key, store.UserPrefix)
		if typ == mvccpb.DELETE {
			delete(users, name)
			return nil
		}
		u := &minicloudv1.User{}
		if err := store.Decode(kv, u); err != nil {
			return err
		}
		users[name] = &credEntry{user: u, principal: userPrincipal(u, "")}
	}
	return nil
}

// current says the cache may answer: synced, heard from lately and past
// this server's own writes. Called with c.mu held.
func (c *credCache) current() bool {
	return c.synced && c.rev >= c.minRev && time.Since(c.heard) < credStaleAfter
}

// lookup returns token id of user and the user's cached entry, and ok
// false when the cache cannot answer (the caller reads etcd).
func (c *credCache) lookup(user, id string) (*minicloudv1.Token, *credEntry, bool) {
	c.start()
	c.mu.RLock()
	defer c.mu.RUnlock()
	if !c.current() {
		return nil, nil, false
	}
	tok, u := c.tokens[store.TokenKey(user, id)], c.users[user]
	if tok == nil || u == nil {
		return nil, nil, false
	}
	c.hits.Add(1)
	return tok, u, true
}

// isRevoked says whether serial is on the deny-list, and ok false when
// the cache cannot answer.
func (c *credCache) isRevoked(serial string) (revoked, ok bool) {
	c.start()
	c.mu.RLock()
	defer c.mu.RUnlock()
	if !c.current() {
		return false, false
	}
	c.hits.Add(1)
	return c.revoked[serial], true
}

// unknownRev is minRev while a write's revision is unknown: the cache does
// not answer until a list begun after the write is installed.
const unknownRev = math.MaxInt64

// wrote makes the cache wait for a credential write this server just
// made: until the watch reaches etcd's revision now (which includes the
// write), calls read etcd. If that revision cannot be read, the cache is
// unanswering until it lists again (a list begun after the write).
func (c *credCache) wrote(ctx context.Context) {
	resp, err := c.s.etcd.Get(context.WithoutCancel(ctx), "health", clientv3.WithCountOnly())
	c.mu.Lock()
	if err != nil {
		c.minRev, c.epoch = unknownRev, c.epoch+1
	} else {
		c.minRev = max(c.minRev, resp.Header.Revision)
	}
	c.mu.Unlock()
	wake := c.poke
	if err != nil {
		wake = c.relist
	}
	select {
	case wake <- struct{}{}:
	default:
	}
}
