package server

import (
	"context"
	"errors"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// The VM watch cache (Kubernetes' apiserver watch cache, in small): one
// etcd watch per API server folds every VM change into one copy of every
// VM, and appends the change (the VM before and after) to a ring of the
// last vmHistory changes. Every WatchVMs and WatchAssignments stream
// reads that ring at its own position and filters it; a stream holds no
// VM of its own, so 100 streams cost what one does (docs/benchmarks.md,
// "watch"). Published VMs are never modified: a change makes a new VM
// that shares the unchanged half (spec or status) with the old one, so
// streams send them without copying.

// vmHistory is how many changes the ring keeps: how far a stream may fall
// behind (a slow client) and how old a resource_version a watch may
// resume from, before it must watch again from 0.
var vmHistory = 8192

// vmChange is one VM's change at rev: prev nil for a new VM, cur nil for
// a removed one.
type vmChange struct {
	rev       int64
	prev, cur *minicloudv1.VM
}

type vmCache struct {
	s *Server

	mu sync.Mutex
	// running says the etcd watch runs; failed ends every stream (the
	// cache fell behind etcd's compaction and starts over).
	running bool
	failed  error
	// gen counts the starts: a stream of an earlier one ends.
	gen uint64
	// breaks counts the etcd watch's interruptions: a stream that saw
	// fewer ends with breakErr.
	breaks   uint64
	breakErr error
	vms      map[string]*minicloudv1.VM
	// orphans are statuses without a spec (never seen in practice: both
	// are written and removed in one transaction).
	orphans map[string]*minicloudv1.VMStatus
	rev     int64 // the revision the cache reflects
	ring    []vmChange
	size    uint64 // len(ring)
	head    uint64 // sequence number of the next change
	// floor is the oldest revision a stream may resume from: every change
	// after it is in the ring.
	floor int64
	// wake is closed (and replaced) when changes are appended.
	wake chan struct{}
}

// start makes sure the cache holds the current VMs and follows etcd.
func (c *vmCache) start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running {
		return nil
	}
	vms, rev, err := store.ListVMs(ctx, c.s.etcd, 0)
	if err != nil {
		return err
	}
	c.vms = make(map[string]*minicloudv1.VM, len(vms))
	c.orphans = map[string]*minicloudv1.VMStatus{}
	for _, vm := range vms {
		c.vms[vm.GetMeta().GetId()] = vm
	}
	c.rev, c.floor = rev, rev
	c.gen++
	c.ring = make([]vmChange, vmHistory)
	c.size = uint64(vmHistory)
	if c.wake == nil {
		c.wake = make(chan struct{})
	}
	c.running = true
	go c.follow(rev)
	return nil
}

// follow applies etcd's changes after rev until the server stops. A watch
// that breaks (no leader, network) is opened again from the last revision
// applied, and the streams end with UNAVAILABLE meanwhile (interrupt), so
// that their clients resume, here or at another replica, rather than wait
// on a replica cut off from etcd; only compaction past it makes the cache
// start over.
func (c *vmCache) follow(rev int64) {
	ctx := c.s.streams
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := c.s.etcd.Watch(wctx, store.VMSpecPrefix, clientv3.WithRange(store.PrefixEnd(store.VMStatusPrefix)), clientv3.WithRev(rev+1))
		for resp := range wch {
			if err := resp.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					cancel()
					c.fail(errdefs.Conflict("the API server's VM cache fell behind etcd compaction at revision %d: watch again from 0", resp.CompactRevision))
					return
				}
				c.interrupt(err)
				break
			}
			if err := c.apply(resp.Events); err != nil {
				cancel()
				c.fail(err)
				return
			}
			if n := len(resp.Events); n > 0 {
				rev = resp.Events[n-1].Kv.ModRevision
			}
		}
		cancel()
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	c.fail(errdefs.Unavailable("API server is shutting down: watch again"))
}

// interrupt ends every stream (the cache keeps its VMs and history).
func (c *vmCache) interrupt(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.breaks++
	c.breakErr = errdefs.Wrap(errdefs.KindUnavailable, err, "the API server's etcd watch of VMs broke: watch again")
	close(c.wake)
	c.wake = make(chan struct{})
}

// fail ends every stream with err; the next stream starts the cache again.
func (c *vmCache) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.running, c.failed = false, err
	c.vms, c.orphans, c.ring = nil, nil, nil
	close(c.wake)
	c.wake = make(chan struct{})
}

// apply folds etcd events on vms/spec and vms/status into the cache, one
// revision at a time (a transaction's changes share one, so a VM is never
// seen half-written), and appends one change per VM touched.
func (c *vmCache) apply(events []*clientv3.Event) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	appended := false
	for i := 0; i < len(events); {
		rev := events[i].Kv.ModRevision
		prev := map[string]*minicloudv1.VM{}
		var touched []string
		for ; i < len(events) && events[i].Kv.ModRevision == rev; i++ {
			id := store.LastSegment(string(events[i].Kv.Key))
			if _, ok := prev[id]; !ok {
				prev[id] = c.vms[id]
				touched = append(touched, id)
			}
			if err := c.applyOne(id, events[i]); err != nil {
				return err
			}
		}
		for _, id := range touched {
			slot := &c.ring[c.head%c.size]
			if c.head >= c.size {
				// The change overwritten is no longer replayable: a
				// stream must have seen its revision to resume.
				c.floor = slot.rev
			}
			*slot = vmChange{rev: rev, prev: prev[id], cur: c.vms[id]}
			c.head++
			appended = true
		}
		c.rev = rev
	}
	if appended {
		close(c.wake)
		c.wake = make(chan struct{})
	}
	return nil
}

// applyOne replaces (never modifies) the VM that ev touches.
func (c *vmCache) applyOne(id string, ev *clientv3.Event) error {
	old := c.vms[id]
	isSpec := strings.HasPrefix(string(ev.Kv.Key), store.VMSpecPrefix)
	switch {
	case ev.Type == mvccpb.DELETE && isSpec:
		delete(c.vms, id)
		if old != nil && old.Status.GetStatusVersion() != 0 {
			c.orphans[id] = old.Status
		}
	case ev.Type == mvccpb.DELETE:
		delete(c.orphans, id)
		if old != nil {
			c.vms[id] = &minicloudv1.VM{Meta: old.Meta, Spec: old.Spec, Status: &minicloudv1.VMStatus{}}
		}
	case isSpec:
		vm, err := store.DecodeVM(ev.Kv, nil)
		if err != nil {
			return err
		}
		switch {
		case old != nil:
			vm.Status = old.Status
		case c.orphans[id] != nil:
			vm.Status = c.orphans[id]
			delete(c.orphans, id)
		}
		c.vms[id] = vm
	default:
		st := &minicloudv1.VMStatus{}
		if err := store.Decode(ev.Kv, st); err != nil {
			return err
		}
		st.StatusVersion = ev.Kv.ModRevision
		if old == nil {
			c.orphans[id] = st
			return nil
		}
		c.vms[id] = &minicloudv1.VM{Meta: old.Meta, Spec: old.Spec, Status: st}
	}
	return nil
}

// watchVMs streams every change of the VMs that match, in etcd revision
// order, as whole VMs. With fromRev 0 it first hands the current matching
// VMs (by project and name) to snapshot; otherwise it replays every
// change after fromRev. A VM that stops matching (deleted, moved to
// another host) is sent as DELETED with its last state. The VMs handed to
// snapshot and emit are shared by every stream: they must not be modified.
func (s *Server) watchVMs(ctx context.Context, fromRev int64, match func(*minicloudv1.VM) bool,
	snapshot func([]*minicloudv1.VM, int64) error,
	emit func(minicloudv1.WatchEventType, *minicloudv1.VM, int64) error,
) error {
	c := s.vmCache
	if fromRev > 0 {
		// The cache may lag etcd (it moves on VM changes only): what it
		// has not seen yet is not necessarily in the future.
		resp, err := s.etcd.Get(ctx, "health", clientv3.WithCountOnly())
		if err != nil {
			return errdefs.Wrap(errdefs.KindUnavailable, err, "read the etcd revision")
		}
		if fromRev > resp.Header.Revision {
			return errdefs.Invalid("resource_version %d is in the future", fromRev)
		}
	}
	if err := c.start(ctx); err != nil {
		return err
	}
	c.mu.Lock()
	cursor, lastRev, gen, breaks := c.head, fromRev, c.gen, c.breaks
	var initial []*minicloudv1.VM
	switch {
	case fromRev == 0:
		for _, vm := range c.vms {
			if match(vm) {
				initial = append(initial, vm)
			}
		}
		lastRev = c.rev
	case fromRev < c.floor:
		c.mu.Unlock()
		return errdefs.Conflict("resource_version %d is too old (this API server replays changes after revision %d only: the last %d, since it started): watch again from 0", fromRev, c.floor, c.size)
	case fromRev < c.rev:
		// Replay from the first change after fromRev.
		oldest := uint64(0)
		if c.head > c.size {
			oldest = c.head - c.size
		}
		cursor = oldest + uint64(sort.Search(int(c.head-oldest), func(i int) bool { return c.ring[(oldest+uint64(i))%c.size].rev > fromRev }))
	}
	c.mu.Unlock()
	if fromRev == 0 {
		slices.SortFunc(initial, func(a, b *minicloudv1.VM) int {
			return strings.Compare(a.GetMeta().GetProject()+"/"+a.GetMeta().GetName(), b.GetMeta().GetProject()+"/"+b.GetMeta().GetName())
		})
		if err := snapshot(initial, lastRev); err != nil {
			return err
		}
		initial = nil
	}

	var batch []vmChange
	for {
		c.mu.Lock()
		for cursor == c.head && c.running && c.gen == gen && c.breaks == breaks {
			wake := c.wake
			c.mu.Unlock()
			select {
			case <-wake:
			case <-ctx.Done():
				return ctx.Err()
			}
			c.mu.Lock()
		}
		if !c.running || c.gen != gen {
			err := c.failed
			c.mu.Unlock()
			if s.streams.Err() != nil {
				return errdefs.Unavailable("API server is shutting down: watch again from resource_version %d", lastRev)
			}
			if err == nil || c.gen != gen {
				err = errdefs.Conflict("the API server's VM cache started over: watch again from 0")
			}
			return err
		}
		if c.breaks != breaks {
			err := c.breakErr
			c.mu.Unlock()
			return err
		}
		if c.head-cursor > c.size {
			c.mu.Unlock()
			return errdefs.Conflict("watch fell more than %d changes behind (a slow reader): watch again from 0", c.size)
		}
		batch = batch[:0]
		for ; cursor < c.head; cursor++ {
			batch = append(batch, c.ring[cursor%c.size])
		}
		c.mu.Unlock()
		for _, ch := range batch {
			if ch.rev <= fromRev {
				continue // the client has it (it resumed after fromRev)
			}
			if err := emitChange(ch, match, emit); err != nil {
				return err
			}
			lastRev = ch.rev
		}
	}
}

// emitChange sends what change means to a stream that holds the VMs that
// match: it held prev if prev matched, and holds cur if cur matches.
func emitChange(ch vmChange, match func(*minicloudv1.VM) bool, emit func(minicloudv1.WatchEventType, *minicloudv1.VM, int64) error) error {
	had := ch.prev != nil && match(ch.prev)
	now := ch.cur != nil && match(ch.cur)
	switch {
	case now && !had:
		return emit(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, ch.cur, ch.rev)
	case now && had:
		return emit(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, ch.cur, ch.rev)
	case !now && had:
		last := ch.prev
		if ch.cur != nil {
			last = ch.cur
		}
		return emit(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED, last, ch.rev)
	}
	return nil
}
