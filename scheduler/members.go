package scheduler

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/store"
)

// Work sharing between replicas. Correctness never depends on it (every
// commit is guarded by compares), but without it every replica works on
// every PENDING VM and most of the second replica's work ends in a lost
// race. Each replica announces itself under schedulers/<id> on a lease and
// watches the others; a PENDING VM is decided at once by the replica that
// rendezvous hashing names its owner, and by every other replica only if it
// is still PENDING takeoverDelay later (its owner died, is partitioned, or
// is far behind). No leader, no election: a replica that disappears costs
// at most takeoverDelay of latency for its share.

const (
	memberTTL     = 10 // seconds
	takeoverDelay = 5 * time.Second
)

type members struct {
	cli  *clientv3.Client
	self string

	mu    sync.Mutex
	ids   map[string]bool
	ready bool
	// joined is closed once this replica has announced itself and read
	// the membership for the first time.
	joined     chan struct{}
	joinedOnce sync.Once
}

func newMembers(cli *clientv3.Client, self string) *members {
	return &members{cli: cli, self: self, ids: map[string]bool{}, joined: make(chan struct{})}
}

// owns reports whether this replica should decide vmID at once.
func (m *members) owns(vmID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.ready || len(m.ids) == 0 || !m.ids[m.self] {
		return true // alone, or not announced yet: own everything
	}
	best, bestScore := "", uint64(0)
	for id := range m.ids {
		h := fnv.New64a()
		h.Write([]byte(id))
		h.Write([]byte{0})
		h.Write([]byte(vmID))
		if s := mix64(h.Sum64()); best == "" || s > bestScore || (s == bestScore && id < best) {
			best, bestScore = id, s
		}
	}
	return best == m.self
}

// mix64 is splitmix64's finaliser: FNV alone spreads similar keys
// (vm-1, vm-2, ...) unevenly between replicas.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// run announces this replica and follows the membership until ctx ends.
func (m *members) run(ctx context.Context, log func(msg string, args ...any)) {
	for ctx.Err() == nil {
		err := m.session(ctx)
		if ctx.Err() != nil {
			return
		}
		m.mu.Lock()
		m.ready = false
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
	m.ready = true
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
			m.mu.Unlock()
		}
	}
}
