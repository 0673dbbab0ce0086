package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/store"
)

// Work sharing between replicas. Correctness never depends on it (every
// commit is guarded by compares), but without it replicas race: every
// replica works on every PENDING VM, and a replica whose view lags picks
// hosts another replica has just changed, so its commit fails. Each
// replica announces itself under schedulers/<id> on a lease and watches the
// others; rendezvous hashing then splits both the VMs and the hosts:
//   - a PENDING VM is decided at once by its owner, and by every other
//     replica only if it is still PENDING takeoverDelay later (its owner
//     died, is partitioned, or is far behind); all members of a server
//     group share one owner, which decides them one after the other;
//   - a replica searches its own share of the hosts first and all hosts
//     only when none of its own fits (placement.Cluster.Partitioned).
//
// No leader, no election: a replica that disappears costs at most
// takeoverDelay of latency for its share of the VMs.

const (
	memberTTL     = 10 // seconds
	takeoverDelay = 5 * time.Second
)

type members struct {
	cli  *clientv3.Client
	self string

	mu  sync.Mutex
	ids map[string]bool
	// view is an immutable copy of the membership that the hot path
	// (ownership checks during a decision) reads without locking.
	view atomic.Pointer[shareView]
	// joined is closed once this replica has announced itself and read
	// the membership for the first time.
	joined     chan struct{}
	joinedOnce sync.Once
	// changed is closed (and replaced) whenever the view changes.
	changed chan struct{}
	// onChange, if set, is called (with mu held) after the view changed.
	onChange func()
}

// shareView is one membership as seen by this replica.
type shareView struct {
	self string
	ids  []string // empty: own everything
}

func newMembers(cli *clientv3.Client, self string) *members {
	m := &members{cli: cli, self: self, ids: map[string]bool{}, joined: make(chan struct{}), changed: make(chan struct{})}
	m.view.Store(&shareView{self: self})
	return m
}

// publish installs a new view from m.ids (mu held); ready false means
// "not announced": own everything.
func (m *members) publish(ready bool) {
	v := &shareView{self: m.self}
	if ready && len(m.ids) >= 2 && m.ids[m.self] {
		for id := range m.ids {
			v.ids = append(v.ids, id)
		}
	}
	m.view.Store(v)
	if m.onChange != nil {
		m.onChange()
	}
	close(m.changed)
	m.changed = make(chan struct{})
}

// waitMembers blocks until this replica sees n members (ctx bounds it).
func (m *members) waitMembers(ctx context.Context, n int) error {
	for {
		m.mu.Lock()
		got, changed := len(m.view.Load().ids), m.changed
		m.mu.Unlock()
		if got == n {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("replica sees %d members, want %d: %w", got, n, ctx.Err())
		}
	}
}

// owns reports whether this replica should decide at once the VMs with
// this share key (vmState.shareKey).
func (m *members) owns(key string) bool { return m.view.Load().ownerIsSelf("vm", key) }

// prefersHost reports whether host is in this replica's share of the
// hosts, searched first (placement.Cluster.Partitioned).
func (m *members) prefersHost(host string) bool { return m.view.Load().ownerIsSelf("host", host) }

// ownerIsSelf: rendezvous (highest random weight) hashing of kind/key over
// the replicas. Every replica computes the same owner from the same member
// set, and a replica joining or leaving moves only its own share.
func (v *shareView) ownerIsSelf(kind, key string) bool {
	if len(v.ids) == 0 {
		return true
	}
	best, bestScore := "", uint64(0)
	for _, id := range v.ids {
		if s := weight(id, kind, key); best == "" || s > bestScore || (s == bestScore && id < best) {
			best, bestScore = id, s
		}
	}
	return best == v.self
}

// weight is FNV-1a over id, kind and key (NUL separated) with splitmix64's
// finaliser: FNV alone spreads similar keys (vm-1, vm-2, ...) unevenly.
func weight(id, kind, key string) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for _, s := range [3]string{id, kind, key} {
		for i := 0; i < len(s); i++ {
			h ^= uint64(s[i])
			h *= prime
		}
		h *= prime // the NUL separator
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	return h ^ h>>31
}

// run announces this replica and follows the membership until ctx ends.
func (m *members) run(ctx context.Context, log func(msg string, args ...any)) {
	for ctx.Err() == nil {
		err := m.session(ctx)
		if ctx.Err() != nil {
			return
		}
		m.mu.Lock()
		m.publish(false)
		m.mu.Unlock()
		log("scheduler membership lost, re-announcing", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (m *members) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lease, err := m.cli.Grant(ctx, memberTTL)
	if err != nil {
		return fmt.Errorf("grant membership lease: %w", err)
	}
	defer func() {
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer rcancel()
		_, _ = m.cli.Revoke(rctx, lease.ID) // leave at once on shutdown
	}()
	ka, err := m.cli.KeepAlive(ctx, lease.ID)
	if err != nil {
		return fmt.Errorf("keep membership lease alive: %w", err)
	}
	if _, err := m.cli.Put(ctx, store.SchedulerKey(m.self), m.self, clientv3.WithLease(lease.ID)); err != nil {
		return fmt.Errorf("announce replica: %w", err)
	}
	resp, err := m.cli.Get(ctx, store.SchedulerPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return fmt.Errorf("list replicas: %w", err)
	}
	m.mu.Lock()
	m.ids = map[string]bool{}
	for _, kv := range resp.Kvs {
		m.ids[store.LastSegment(string(kv.Key))] = true
	}
	m.publish(true)
	m.mu.Unlock()
	m.joinedOnce.Do(func() { close(m.joined) })
	wch := m.cli.Watch(clientv3.WithRequireLeader(ctx), store.SchedulerPrefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case _, ok := <-ka:
			if !ok {
				return errors.New("membership lease expired")
			}
		case wr, ok := <-wch:
			if !ok {
				return errors.New("replica watch closed")
			}
			if err := wr.Err(); err != nil {
				return fmt.Errorf("watch replicas: %w", err)
			}
			m.mu.Lock()
			for _, ev := range wr.Events {
				id := store.LastSegment(string(ev.Kv.Key))
				if ev.Type == clientv3.EventTypeDelete {
					delete(m.ids, id)
				} else {
					m.ids[id] = true
				}
			}
			m.publish(true)
			m.mu.Unlock()
		}
	}
}
