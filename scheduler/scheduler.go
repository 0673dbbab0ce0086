// Package scheduler is the `minicloudd scheduler` role: it assigns every
// PENDING VM to a host and flags the VMs of hosts that lost their heartbeat.
//
// A decision is placement.Schedule over the watched snapshot (package
// snapshot); it is committed as a capacity claim in one etcd transaction
// that compares the host allocation's and the VM status's mod revisions
// (pkg/store claims.go). Several replicas may run at once: they coordinate
// only through those compares (optimistic concurrency, as Nomad's plan
// applier and Omega do), so a replica that loses a race refreshes the host
// and decides again. docs/scheduler.md explains the choice.
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/placement"
	"github.com/minicloud/minicloud/scheduler/snapshot"
)

// Defaults for Config.
const (
	DefaultMaxAttempts = 3
	DefaultWorkers     = 16
	// maxCommitAttempts bounds how often one pass over a VM decides again
	// after losing a commit race; after that the VM is requeued.
	maxCommitAttempts = 8
	// queueWindow: see queue.
	queueWindow = 1024
)

// Config configures a Scheduler. The zero value of each field means its
// default.
type Config struct {
	// Policy is the filter chain and weighers (default: spread).
	Policy *placement.Policy
	// MaxAttempts is how many hosts a VM is placed on before it goes to
	// ERROR; a reschedule (the API sets PENDING and appends the failed host
	// to tried_hosts) counts as a new attempt.
	MaxAttempts int
	// Workers is the number of VMs decided and committed concurrently. More
	// than one lets etcd batch the commits into fewer disk syncs.
	Workers int
	// Source names this replica in VM events (default "scheduler").
	Source string
	Log    *slog.Logger
	// Observe, if set, is called after every decision (for metrics and the
	// benchmark harness). It must be fast and safe for concurrent use.
	Observe func(Observation)
}

// Observation describes one decision.
type Observation struct {
	VMID string
	// Host is where the VM was placed, "" if it was not.
	Host string
	// Outcome is "scheduled", "no-valid-host", "conflict" (the host's
	// allocation changed since the view was taken: decide again),
	// "vm-changed" (another replica or the API changed the VM first) or
	// "retry" (only hosts full with this replica's uncommitted placements
	// would fit). A placement that no longer fitted its host when its
	// group was committed (the view moved) counts as a conflict.
	Outcome string
	// DecideTime is the duration of the pure placement.Schedule call.
	DecideTime time.Duration
}

// Scheduler is one replica.
type Scheduler struct {
	cli  *clientv3.Client
	cfg  Config
	log  *slog.Logger
	snap *snapshot.Snapshot

	lanes    *lanes
	batch    *batcher
	members  *members
	pending  *queue // VMs to place
	hostDown *queue // VMs whose host_down may be wrong

	mu    sync.Mutex
	vms   map[string]vmEntry         // VM status cache, from the status watch
	specs map[string]*minicloudv1.VM // specs of PENDING VMs, from the spec watch
	on    map[string]map[string]bool // host -> VM ids placed there
	// listed: vms holds a complete list (false from the start and
	// during a re-list, while it refills).
	listed bool
}

// vmEntry is the newest status the watch delivered for a VM. The decoded
// status is never modified (writers clone it), so it can be handed out.
type vmEntry struct {
	status *minicloudv1.VMStatus
	rev    int64
	// pendingSince is when this replica first saw the VM PENDING (since
	// its last phase change): a replica that does not own the VM decides it
	// only takeoverDelay after that.
	pendingSince time.Time
}

// New returns a scheduler replica; Run starts it.
func New(cli *clientv3.Client, cfg Config) (*Scheduler, error) {
	if cfg.Policy == nil {
		p, err := placement.NewPolicy(placement.Spread)
		if err != nil {
			return nil, err
		}
		cfg.Policy = p
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.Source == "" {
		cfg.Source = "scheduler"
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &Scheduler{
		cli: cli, cfg: cfg, log: cfg.Log,
		batch:   newBatcher(cli),
		members: newMembers(cli, uuid.NewString()),
		pending: newQueue(queueWindow), hostDown: newQueue(queueWindow),
		vms: map[string]vmEntry{}, specs: map[string]*minicloudv1.VM{}, on: map[string]map[string]bool{},
	}
	s.snap = snapshot.New(cli, cfg.Log, s.hostAliveChanged)
	s.lanes = newLanes(s.snap, s.batch)
	s.snap.SetPreferred(s.members.prefersHost)
	s.members.onChange = func() { s.snap.SetPreferred(s.members.prefersHost) }
	return s, nil
}

// Joined is closed once this replica has announced itself to the others
// (work sharing, see members.go) and knows who they are.
func (s *Scheduler) Joined() <-chan struct{} { return s.members.joined }

// Snapshot is the replica's view (read-only use: tests, metrics).
func (s *Scheduler) Snapshot() *snapshot.Snapshot { return s.snap }

// Run schedules until ctx ends. It returns ctx's error.
func (s *Scheduler) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer s.pending.Close()
	defer s.hostDown.Close()

	wg.Go(func() { _ = s.snap.Run(ctx) })
	wg.Go(func() { s.members.run(ctx, s.log.Warn) })
	select {
	case <-s.snap.Synced():
	case <-ctx.Done():
		return ctx.Err()
	}
	wg.Go(func() { s.watchStatuses(ctx) })
	for range committers {
		wg.Go(func() { s.batch.run(ctx) })
	}
	for range s.cfg.Workers {
		wg.Go(func() { s.work(ctx, s.pending, s.scheduleOne) })
	}
	wg.Go(func() { s.work(ctx, s.hostDown, s.reconcileHostDown) })
	wg.Go(func() { s.fenceLoop(ctx) })
	s.log.Info("scheduler running", "workers", s.cfg.Workers, "max_attempts", s.cfg.MaxAttempts, "source", s.cfg.Source)
	<-ctx.Done()
	return ctx.Err()
}

// work runs one worker: reconcile(id) returns when to look at id again
// (0: not until it changes) or an error (retried with backoff).
func (s *Scheduler) work(ctx context.Context, q *queue, reconcile func(context.Context, string, *rand.Rand) (time.Duration, error)) {
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	failures := map[string]int{}
	for {
		id, ok := q.Get()
		if !ok {
			return
		}
		after, err := reconcile(ctx, id, rng)
		if err != nil && ctx.Err() == nil {
			failures[id]++
			after = min(time.Duration(1<<min(failures[id], 8))*50*time.Millisecond, 10*time.Second)
			s.log.Warn("scheduler: will retry", "vm", id, "err", err, "after", after)
		} else {
			delete(failures, id)
		}
		q.Done(id)
		if after > 0 && ctx.Err() == nil {
			q.AddAfter(id, after)
		}
	}
}

// watchStatuses keeps the VM status cache and feeds the queues: every
// PENDING VM to pending, every VM whose host_down disagrees with its host's
// liveness to hostDown. It re-lists after a watch failure.
func (s *Scheduler) watchStatuses(ctx context.Context) {
	for ctx.Err() == nil {
		err := s.listAndWatchStatuses(ctx)
		if ctx.Err() != nil {
			return
		}
		s.log.Warn("scheduler: status watch failed, re-listing", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (s *Scheduler) listAndWatchStatuses(ctx context.Context) error {
	resp, err := s.cli.Get(ctx, store.VMStatusPrefix, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("list vm statuses: %w", err)
	}
	s.mu.Lock()
	s.vms = map[string]vmEntry{}
	s.on = map[string]map[string]bool{}
	s.specs = map[string]*minicloudv1.VM{}
	s.listed = false
	s.mu.Unlock()
	for _, kv := range resp.Kvs {
		s.statusChanged(mvccpb.PUT, kv)
	}
	s.mu.Lock()
	s.listed = true
	s.mu.Unlock()
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	from := clientv3.WithRev(resp.Header.Revision + 1)
	statuses := s.cli.Watch(wctx, store.VMStatusPrefix, clientv3.WithPrefix(), from)
	specs := s.cli.Watch(wctx, store.VMSpecPrefix, clientv3.WithPrefix(), from)
	for {
		select {
		case wr, ok := <-statuses:
			if !ok {
				return errors.New("vm status watch closed")
			}
			if err := wr.Err(); err != nil {
				return fmt.Errorf("watch vm statuses: %w", err)
			}
			for _, ev := range wr.Events {
				s.statusChanged(ev.Type, ev.Kv)
			}
		case wr, ok := <-specs:
			if !ok {
				return errors.New("vm spec watch closed")
			}
			if err := wr.Err(); err != nil {
				return fmt.Errorf("watch vm specs: %w", err)
			}
			for _, ev := range wr.Events {
				s.specChanged(ev.Type, ev.Kv)
			}
		}
	}
}

// specChanged caches the spec of a VM that may need a decision, so that
// deciding a new VM costs no read. Specs of VMs known to be past PENDING
// are not kept (readVM reads them if one comes back to PENDING).
func (s *Scheduler) specChanged(typ mvccpb.Event_EventType, kv *mvccpb.KeyValue) {
	id := store.LastSegment(string(kv.Key))
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.vms[id]; typ == mvccpb.DELETE || (ok && e.status.GetPhase() != lifecycle.Pending) {
		delete(s.specs, id)
		return
	}
	vm := &minicloudv1.VM{}
	if err := store.Decode(kv, vm); err != nil {
		s.log.Error("scheduler: undecodable vm spec", "key", string(kv.Key), "err", err)
		return
	}
	s.specs[id] = vm
}

func (s *Scheduler) statusChanged(typ mvccpb.Event_EventType, kv *mvccpb.KeyValue) {
	id := store.LastSegment(string(kv.Key))
	s.mu.Lock()
	defer s.mu.Unlock()
	old, hadOld := s.vms[id]
	if hadOld && old.status.GetHost() != "" {
		oldHost := old.status.GetHost()
		delete(s.on[oldHost], id)
		if len(s.on[oldHost]) == 0 {
			delete(s.on, oldHost)
		}
	}
	if typ == mvccpb.DELETE {
		delete(s.vms, id)
		delete(s.specs, id)
		return
	}
	st := &minicloudv1.VMStatus{}
	if err := store.Decode(kv, st); err != nil {
		s.log.Error("scheduler: undecodable vm status", "key", string(kv.Key), "err", err)
		return
	}
	e := vmEntry{status: st, rev: kv.ModRevision}
	if st.GetPhase() == lifecycle.Pending {
		e.pendingSince = time.Now()
		if hadOld && old.status.GetPhase() == lifecycle.Pending {
			e.pendingSince = old.pendingSince
		}
	}
	s.vms[id] = e
	if st.GetPhase() != lifecycle.Pending {
		delete(s.specs, id)
	}
	if host := st.GetHost(); host != "" {
		if s.on[host] == nil {
			s.on[host] = map[string]bool{}
		}
		s.on[host][id] = true
		if st.GetHostDown() == s.snap.Alive(host) {
			s.hostDown.Add(id)
		}
	}
	if st.GetPhase() == lifecycle.Pending {
		s.pending.Add(id) // scheduleOne checks who owns it
	}
}

// hostAliveChanged is the snapshot's callback: every VM on host needs its
// host_down re-checked.
func (s *Scheduler) hostAliveChanged(host string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id := range s.on[host] {
		s.hostDown.Add(id)
	}
}

func (s *Scheduler) observe(o Observation) {
	if s.cfg.Observe != nil {
		s.cfg.Observe(o)
	}
}
