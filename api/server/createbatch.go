package server

import (
	"context"
	"slices"
	"sync"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

// Every VM create of a project changes the project's usage key under a
// compare of its mod revision (store.CreateVMsTxn), so two creates of one
// project can never commit concurrently: of N creates sent at once, one
// would win and N-1 re-read and retry, N times over. Instead this replica
// queues the creates of a project while one commit is in flight and sends
// the queue as one transaction when it returns (group commit): one etcd
// round trip charges and creates them all. Replicas still race each other
// on the usage key; that race is decided by etcd's compare, and the loser
// refreshes its view of the usage and tries again.

// batchCommitTimeout bounds one batch's etcd round trips; the batch does
// not use any caller's context, since it commits for several callers.
const batchCommitTimeout = 30 * time.Second

// maxBatch bounds how many queued creates one pass looks at (admit
// bounds what one transaction carries).
const maxBatch = 32

// createBatcher group-commits VM creates per project.
type createBatcher struct {
	s        *Server
	mu       sync.Mutex
	projects map[string]*projectCreates
}

// projectCreates is one project's queue and what this replica last knew
// of the project's usage.
type projectCreates struct {
	pending []*pendingCreate
	running bool
	usage   store.UsageState
	known   bool // usage was read (or written) by this replica
}

// pendingCreate is one create waiting for its batch.
type pendingCreate struct {
	ctx  context.Context
	nv   store.NewVM
	done chan createResult
}

type createResult struct {
	rev int64
	err error
}

func newCreateBatcher(s *Server) *createBatcher {
	return &createBatcher{s: s, projects: map[string]*projectCreates{}}
}

// commit creates nv's VM, charged to its project, and returns the
// revision of the commit. errRetry means a compare of the VM's own failed
// (a name, an address or a referenced object changed): re-read and try
// again. A create that does not fit in the quota gets ResourceExhausted.
func (b *createBatcher) commit(ctx context.Context, nv store.NewVM) (int64, error) {
	project := nv.VM.GetMeta().GetProject()
	p := &pendingCreate{ctx: ctx, nv: nv, done: make(chan createResult, 1)}
	b.mu.Lock()
	q := b.projects[project]
	if q == nil {
		q = &projectCreates{}
		b.projects[project] = q
	}
	q.pending = append(q.pending, p)
	if !q.running {
		q.running = true
		go b.run(project, q)
	}
	b.mu.Unlock()
	// Waits even if ctx ends: the batch may be committing this VM, and
	// the caller's address reservation must outlive that.
	r := <-p.done
	return r.rev, r.err
}

// run commits the project's queue, batch after batch, until it is empty.
func (b *createBatcher) run(project string, q *projectCreates) {
	for {
		b.mu.Lock()
		batch := q.pending[:min(len(q.pending), maxBatch)]
		q.pending = q.pending[len(batch):]
		if len(batch) == 0 {
			q.running = false
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), batchCommitTimeout)
		later := b.commitBatch(ctx, project, q, batch)
		cancel()
		if len(later) > 0 {
			b.mu.Lock()
			q.pending = append(later, q.pending...)
			b.mu.Unlock()
		}
	}
}

// commitBatch admits what fits in the quota and commits it in one
// transaction. It answers every create of batch except those it returns:
// they collide with another create of the batch (same name or request id)
// or would make the transaction too large, and go in the next one.
func (b *createBatcher) commitBatch(ctx context.Context, project string, q *projectCreates, batch []*pendingCreate) []*pendingCreate {
	answer := func(ps []*pendingCreate, r createResult) {
		for _, p := range ps {
			p.done <- r
		}
	}
	live := batch[:0]
	for _, p := range batch {
		if err := p.ctx.Err(); err != nil {
			p.done <- createResult{err: err}
			continue
		}
		live = append(live, p)
	}
	batch = live
	fresh := false // q.usage was read in this call
	for range maxTxnAttempts {
		if !q.known {
			u, err := store.ReadCountedUsage(ctx, b.s.etcd, project)
			if err != nil {
				answer(batch, createResult{err: err})
				return nil
			}
			q.usage, q.known, fresh = u, true, true
		}
		a := b.admit(project, q.usage, batch)
		if len(a.refused) > 0 && !fresh {
			// Refuse only on a usage read now: what this replica last
			// wrote may be stale (a delete elsewhere gave room back).
			q.known = false
			continue
		}
		if len(a.admitted) == 0 {
			for i, p := range a.refused {
				p.done <- createResult{err: a.errs[i]}
			}
			return a.later
		}
		nvs := make([]store.NewVM, len(a.admitted))
		for i, p := range a.admitted {
			nvs[i] = p.nv
		}
		txn, err := store.CreateVMsTxn(q.usage, a.used, nvs...)
		if err != nil {
			answer(a.admitted, createResult{err: err})
			answer(a.refused, createResult{err: errRetry})
			return a.later
		}
		rev, ok, err := txn.Commit(ctx, b.s.etcd)
		if err != nil {
			q.known = false
			answer(a.admitted, createResult{err: err})
			answer(a.refused, createResult{err: errRetry})
			return a.later
		}
		if ok {
			q.usage.Usage, q.usage.UsageRev = a.used, rev
			answer(a.admitted, createResult{rev: rev})
			// Refused only now: the room went to creates that committed.
			for i, p := range a.refused {
				p.done <- createResult{err: a.errs[i]}
			}
			return a.later
		}
		// Either the usage moved (another replica, a delete, SetQuota) or
		// a compare of some of the VMs failed (a name, an address or a
		// referenced object changed since this replica's create cache saw
		// it). One read says which: the VMs whose compares fail re-read
		// what they refer to (errRetry); the rest are decided again on the
		// usage as it is now and go in the next pass, without a read of
		// their own.
		check, err := store.CheckCreateVMs(ctx, b.s.etcd, project, nvs...)
		if err != nil {
			q.known = false
			answer(batch, createResult{err: err})
			return nil
		}
		q.usage, q.known, fresh = check.Usage, check.Usage.Counted(), true
		lost := make(map[*pendingCreate]bool, len(check.Failed))
		for _, i := range check.Failed {
			lost[a.admitted[i]] = true
			a.admitted[i].done <- createResult{err: errRetry}
		}
		batch = slices.DeleteFunc(batch, func(p *pendingCreate) bool { return lost[p] })
		if len(batch) == 0 {
			return nil
		}
	}
	answer(batch, createResult{err: tooMuchContention("create vms in project " + project)})
	return nil
}

// admission is what one pass over a batch decided.
type admission struct {
	admitted []*pendingCreate
	used     *minicloudv1.QuotaUsage // usage with the admitted creates
	refused  []*pendingCreate        // over quota, with errs
	errs     []error
	later    []*pendingCreate // for the next batch
}

// maxBatchCost bounds a batch transaction's compares and writes (etcd
// refuses more than 128 of either by default).
const maxBatchCost = 100

// admit charges the creates of batch, in order, to usage.
func (b *createBatcher) admit(project string, usage store.UsageState, batch []*pendingCreate) admission {
	limits := store.EffectiveLimits(b.s.quotaDefaults, usage.Overrides)
	a := admission{used: usage.Usage}
	keys := map[string]bool{}
	cost := 2 // the usage key's compares and write
	for _, p := range batch {
		meta := p.nv.VM.GetMeta()
		nameKey, reqKey := store.VMNameKey(project, meta.GetName()), ""
		if p.nv.RequestID != "" {
			reqKey = store.VMRequestKey(project, p.nv.RequestID)
		}
		// A create's compares: name, image, flavor, group, request id and
		// two per network; about as many writes.
		c := 6 + 2*len(p.nv.Networks)
		if keys[nameKey] || (reqKey != "" && keys[reqKey]) || (len(a.admitted) > 0 && cost+c > maxBatchCost) {
			a.later = append(a.later, p)
			continue
		}
		next, err := store.Charge(project, a.used, store.VMUsage(p.nv.VM), limits)
		if err != nil {
			a.refused, a.errs = append(a.refused, p), append(a.errs, err)
			continue
		}
		keys[nameKey], keys[reqKey] = true, true
		cost += c
		a.used = next
		a.admitted = append(a.admitted, p)
	}
	return a
}
