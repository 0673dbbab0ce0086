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
// compare (store.CreateVMsTxn), so two creates of one project can never
// commit concurrently from two independent reads: of N creates sent at
// once, one would win and N-1 re-read and retry, N times over. Instead
// this replica queues the creates of a project and sends them in batches,
// one transaction each (group commit): one etcd round trip charges and
// creates them all. Replicas still race each other on the usage key; that
// race is decided by etcd's compare, and the loser refreshes its view of
// the usage and tries again.
//
// A batch holds at most 14 creates (etcd refuses more than 128 compares
// or writes in one transaction; admit fills it to that), so one batch at
// a time capped a project at a batch per round trip: with 12, ~2,600
// creates/s at a 4.5 ms commit however many callers waited, and a third
// of the machine idle (docs/benchmarks.md, "API"). So up to maxInFlight
// batches are in flight
// at once: each is charged on the usage as the batches before it will
// leave it (store.UsageState.Charged, a compare of the usage key's value
// they write), so it commits only after them, and if one fails the ones
// after it fail too. Transactions sent back to back reach etcd in either
// order, so a batch also fails when it merely overtook the one before it;
// it is then sent again at once, unchanged (run). Any other failure stops the
// sending until every batch in flight has returned; then one read per
// failed batch says which of its creates lost a race (those re-read what
// they refer to) and what the usage is now, and the rest go back to the
// front of the queue.

// batchCommitTimeout bounds one batch's etcd round trips; the batch does
// not use any caller's context, since it commits for several callers.
const batchCommitTimeout = 30 * time.Second

// maxBatch bounds how many queued creates one batch looks at (admit
// bounds what one transaction carries).
const maxBatch = 32

// maxInFlight bounds the batch transactions of one project in flight at
// once. Two, not more: transactions sent back to back reach etcd in
// either order, and one that overtakes the batch before it fails its
// usage compare, as does every batch built on it; with three or four in
// flight those failures cascaded and apibench at 64 clients fell to half
// the creates/s of one at a time (with three, still 0.43-0.50x of raw
// etcd against 0.60-0.70x with two, once an overtaken batch was resent
// at once).
const maxInFlight = 2

// maxResends bounds how often a batch that overtook the one before it is
// sent again at once while that one is still in flight (run); after that
// it waits for it, as a batch that failed otherwise does (settle).
const maxResends = 3

// createBatcher group-commits VM creates per project.
type createBatcher struct {
	s        *Server
	mu       sync.Mutex
	projects map[string]*projectCreates
}

// projectCreates is one project's queue (under createBatcher.mu) and
// what this replica knows of the project's usage (only run's).
type projectCreates struct {
	pending []*pendingCreate
	running bool
	// usage is the project's usage as the batches sent so far leave it.
	usage store.UsageState
	known bool // usage was read (or written) by this replica
	// fresh says usage was read with nothing in flight and no batch was
	// decided on it yet: a create over quota is refused only then.
	fresh bool
	// usageRev is the usage key's mod revision as usage has it, once
	// every batch sent has returned (only run's).
	usageRev int64
	// written is the usage as a later write of this replica outside the
	// batcher left it (under createBatcher.mu; see usageWritten).
	written *store.UsageState
}

// pendingCreate is one create waiting for its batch.
type pendingCreate struct {
	ctx  context.Context
	nv   store.NewVM
	done chan createResult
	// failures is how many batch transactions with this create failed
	// their compares while its own held (the usage moved).
	failures int
}

type createResult struct {
	rev int64
	err error
}

// sentBatch is one batch transaction sent, and then its outcome.
type sentBatch struct {
	admitted []*pendingCreate
	nvs      []store.NewVM // admitted's
	refused  []*pendingCreate
	errs     []error          // refused's: over quota once admitted commit
	after    store.UsageState // the usage as this batch leaves it
	txn      store.Txn
	// prev is the batch sent before this one, if it was still in flight.
	prev *sentBatch

	// Set by the commit:
	rev int64
	ok  bool
	err error
	// Set by run once the commit returned:
	returned bool
	overtook bool // failed, but perhaps only for prev (overtakes)
	resends  int  // of txn, each after overtaking prev
}

// overtakes says whether sb, whose compares failed, may have failed only
// because etcd applied it before prev, the batch it is charged after: prev
// has not returned yet, or it committed at a later revision than sb's
// failure (etcd answers a failed transaction with the revision it was
// decided at).
func (sb *sentBatch) overtakes() bool {
	if sb.prev == nil {
		return false
	}
	return !sb.prev.returned || (sb.prev.ok && sb.rev < sb.prev.rev)
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

// usageWritten takes the project's usage as a commit of this replica at
// rev wrote it outside the batcher (a VM's removal gives its share back):
// the project's next batch is charged on it. Otherwise the batcher's own
// idea of the usage is stale after every delete, and the next create
// failed its usage compare and paid a check read and a second commit
// (3-4 ms of one create after a delete in hack/agentbench). It is taken
// only if newer than what the batcher knows (usageRev), so a write that
// raced a batch of the batcher's is never taken over the batch's.
func (b *createBatcher) usageWritten(u store.UsageState, rev int64) {
	u.UsageRev = rev
	b.mu.Lock()
	defer b.mu.Unlock()
	q := b.projects[u.Project]
	if q == nil {
		return // nothing known yet to go stale: the first create reads it
	}
	if q.written == nil || q.written.UsageRev < rev {
		q.written = &u
	}
}

// run commits the project's queue, batch after batch and up to
// maxInFlight batches at once, until it is empty.
func (b *createBatcher) run(project string, q *projectCreates) {
	done := make(chan *sentBatch, maxInFlight)
	inFlight := 0
	var failed []*sentBatch
	var last, lastOK *sentBatch
	for {
		for len(failed) == 0 && inFlight < maxInFlight {
			prev := last
			if prev != nil && prev.returned {
				prev = nil
			}
			sb := b.send(project, q, inFlight, prev, done)
			if sb == nil {
				break
			}
			last = sb
			inFlight++
		}
		if inFlight == 0 {
			if len(failed) > 0 {
				b.settle(project, q, failed, lastOK)
				failed = nil
				continue
			}
			b.mu.Lock()
			if len(q.pending) == 0 {
				q.running = false
				b.mu.Unlock()
				return
			}
			b.mu.Unlock()
			continue
		}
		sb := <-done
		inFlight--
		sb.returned = true
		switch {
		case sb.err != nil:
			// It may or may not have committed: read the usage again
			// before the next batch.
			q.known = false
			answer(sb.admitted, createResult{err: sb.err})
			answer(sb.refused, createResult{err: errRetry})
		case sb.ok:
			if sb == last {
				// q.usage is as the last batch sent leaves it.
				q.usageRev = sb.rev
			}
			if lastOK == nil || sb.rev > lastOK.rev {
				// Answers come back in either order too; the usage is
				// as the last batch to commit left it.
				lastOK = sb
			}
			answer(sb.admitted, createResult{rev: sb.rev})
			// Refused only now: the room went to creates that committed.
			for i, p := range sb.refused {
				p.done <- createResult{err: sb.errs[i]}
			}
		default:
			sb.overtook = sb.overtakes()
			if sb.overtook && sb.resends < maxResends {
				// It reached etcd before the batch it is charged after,
				// which has committed since or is most likely right behind
				// it: send the same transaction again now, still compared
				// with the usage as that batch leaves it, instead of
				// stopping the pipeline until every batch has returned
				// (settle). If that batch fails, so does this one, and
				// recheck decides.
				sb.resends++
				sb.returned = false
				b.commitBatch(sb, done)
				inFlight++
				continue
			}
			failed = append(failed, sb)
		}
	}
}

// send takes the next batch off q's queue, decides it on q.usage and
// sends its transaction (prev: the batch sent before it, if in flight),
// whose outcome goes to done. It returns the batch sent, or nil when the
// queue is empty or when the usage must be read first and batches are in
// flight (a read must see them committed or failed).
func (b *createBatcher) send(project string, q *projectCreates, inFlight int, prev *sentBatch, done chan<- *sentBatch) *sentBatch {
	for {
		if !q.known && inFlight > 0 {
			return nil
		}
		b.mu.Lock()
		batch := q.pending[:min(len(q.pending), maxBatch)]
		q.pending = q.pending[len(batch):]
		written := q.written
		if inFlight == 0 {
			q.written = nil
		}
		b.mu.Unlock()
		if inFlight == 0 && written != nil && q.known && written.UsageRev > q.usageRev {
			// Not fresh: a create over quota is refused only on a read.
			q.usage, q.usageRev, q.fresh = *written, written.UsageRev, false
		}
		if len(batch) == 0 {
			return nil
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
		if len(batch) == 0 {
			continue
		}
		if !q.known {
			ctx, cancel := context.WithTimeout(context.Background(), batchCommitTimeout)
			u, err := store.ReadCountedUsage(ctx, b.s.etcd, project)
			cancel()
			if err != nil {
				answer(batch, createResult{err: err})
				continue
			}
			q.usage, q.known, q.fresh, q.usageRev = u, true, true, u.UsageRev
		}
		a, fresh := b.admit(project, q.usage, batch), q.fresh
		q.fresh = false
		if len(a.refused) > 0 && !fresh {
			// Refuse only on a usage read now: what this replica last
			// wrote may be stale (a delete elsewhere gave room back).
			q.known = false
			b.requeue(q, batch)
			continue
		}
		b.requeue(q, a.later)
		if len(a.admitted) == 0 {
			for i, p := range a.refused {
				p.done <- createResult{err: a.errs[i]}
			}
			continue
		}
		sb := &sentBatch{admitted: a.admitted, nvs: make([]store.NewVM, len(a.admitted)), refused: a.refused, errs: a.errs, prev: prev}
		for i, p := range a.admitted {
			sb.nvs[i] = p.nv
		}
		txn, err := store.CreateVMsTxn(q.usage, a.used, sb.nvs...)
		if err == nil {
			q.usage, err = q.usage.Charged(a.used)
		}
		if err != nil {
			answer(a.admitted, createResult{err: err})
			answer(a.refused, createResult{err: errRetry})
			continue
		}
		sb.after, sb.txn = q.usage, txn
		b.commitBatch(sb, done)
		return sb
	}
}

// commitBatch sends sb's transaction; its outcome goes to done.
func (b *createBatcher) commitBatch(sb *sentBatch, done chan<- *sentBatch) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), batchCommitTimeout)
		defer cancel()
		sb.rev, sb.ok, sb.err = sb.txn.Commit(ctx, b.s.etcd)
		done <- sb
	}()
}

// settle decides again on the creates of batches whose transactions
// failed their compares, once nothing is in flight. Transactions sent
// back to back can reach etcd in either order (etcd serves each request
// on its own goroutine), and one that overtakes the batch before it fails
// its usage compare for that alone: if every failed batch overtook one
// that then committed (and was still so after run had sent it again
// maxResends times), its creates go straight back to the front of the
// queue, on the usage as the last batch that committed left it, with no
// read. (If one of them had lost a race of its own, its next transaction
// fails again, with nothing before it to overtake, and goes to recheck.)
// Otherwise recheck reads what happened.
func (b *createBatcher) settle(project string, q *projectCreates, failed []*sentBatch, lastOK *sentBatch) {
	overtaken := lastOK != nil
	for _, sb := range failed {
		overtaken = overtaken && sb.overtook && sb.prev.ok
	}
	if !overtaken {
		b.recheck(project, q, failed)
		return
	}
	var again []*pendingCreate
	for _, sb := range failed {
		for _, p := range sb.admitted {
			if p.failures++; p.failures >= maxTxnAttempts {
				p.done <- createResult{err: tooMuchContention("create vms in project " + project)}
				continue
			}
			again = append(again, p)
		}
		again = append(again, sb.refused...)
	}
	q.usage, q.known, q.usageRev = lastOK.after, true, lastOK.rev
	b.requeue(q, again)
}

// recheck decides again on the creates of batches whose transactions
// failed their compares, once nothing is in flight. Either the usage moved
// (another replica, a delete, SetQuota, or a batch before it that failed)
// or a compare of some of the VMs failed (a name, an address or a
// referenced object changed since this replica's create cache saw it).
// One read per batch says which: the VMs whose compares fail re-read what
// they refer to (errRetry); the rest go back to the front of the queue,
// to be decided again on the usage as it is now, without a read of their
// own.
func (b *createBatcher) recheck(project string, q *projectCreates, failed []*sentBatch) {
	var again []*pendingCreate
	for _, sb := range failed {
		ctx, cancel := context.WithTimeout(context.Background(), batchCommitTimeout)
		check, err := store.CheckCreateVMs(ctx, b.s.etcd, project, sb.nvs...)
		cancel()
		if err != nil {
			q.known = false
			answer(sb.admitted, createResult{err: err})
			answer(sb.refused, createResult{err: err})
			continue
		}
		q.usage, q.known, q.fresh, q.usageRev = check.Usage, check.Usage.Counted(), true, check.Usage.UsageRev
		lost := make([]bool, len(sb.admitted))
		for _, i := range check.Failed {
			lost[i] = true
		}
		for i, p := range sb.admitted {
			switch p.failures++; {
			case lost[i]:
				p.done <- createResult{err: errRetry}
			case p.failures >= maxTxnAttempts:
				p.done <- createResult{err: tooMuchContention("create vms in project " + project)}
			default:
				again = append(again, p)
			}
		}
		again = append(again, sb.refused...)
	}
	b.requeue(q, again)
}

// requeue puts ps back at the front of q's queue.
func (b *createBatcher) requeue(q *projectCreates, ps []*pendingCreate) {
	if len(ps) == 0 {
		return
	}
	b.mu.Lock()
	q.pending = append(slices.Clone(ps), q.pending...)
	b.mu.Unlock()
}

func answer(ps []*pendingCreate, r createResult) {
	for _, p := range ps {
		p.done <- r
	}
}

// admission is what one pass over a batch decided.
type admission struct {
	admitted []*pendingCreate
	used     *minicloudv1.QuotaUsage // usage with the admitted creates
	refused  []*pendingCreate        // over quota, with errs
	errs     []error
	later    []*pendingCreate // for the next batch
}

// admit charges the creates of batch, in order, to usage.
func (b *createBatcher) admit(project string, usage store.UsageState, batch []*pendingCreate) admission {
	limits := store.EffectiveLimits(b.s.quotaDefaults, usage.Overrides)
	a := admission{used: usage.Usage}
	keys := map[string]bool{}
	cmps, ops := 2, 1 // the usage key's (ChargeOps)
	for _, p := range batch {
		meta := p.nv.VM.GetMeta()
		nameKey, reqKey := store.VMNameKey(project, meta.GetName()), ""
		if p.nv.RequestID != "" {
			reqKey = store.VMRequestKey(project, p.nv.RequestID)
		}
		// Filled to etcd's limit, counted exactly: a create with one
		// network is 8 compares and 9 writes (its audit record one of
		// them), so 14 fit where an estimate with a margin let 12 in, and
		// the batch is what a round trip carries (see the top of this
		// file).
		c, o := store.CreateVMSize(p.nv)
		if keys[nameKey] || (reqKey != "" && keys[reqKey]) || (len(a.admitted) > 0 && (cmps+c > store.MaxTxnOps || ops+o > store.MaxTxnOps)) {
			a.later = append(a.later, p)
			continue
		}
		next, err := store.Charge(project, a.used, store.VMUsage(p.nv.VM), limits)
		if err != nil {
			a.refused, a.errs = append(a.refused, p), append(a.errs, err)
			continue
		}
		keys[nameKey], keys[reqKey] = true, true
		cmps, ops = cmps+c, ops+o
		a.used = next
		a.admitted = append(a.admitted, p)
	}
	return a
}
