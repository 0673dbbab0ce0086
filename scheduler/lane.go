package scheduler

import (
	"context"
	"fmt"
	"sync"

	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/placement"
	"github.com/minicloud/minicloud/scheduler/snapshot"
)

// Group commit per host. Placements on one host cannot share a commit as
// separate nested transactions (each would put the host's allocation key,
// and a transaction may not write a key twice), and two commits on one host
// in flight at once would race on that key. So each host has a lane: at
// most one commit for the host is in flight, and the placements decided
// while it is (they stack on it: snapshot.Reserve counts uncommitted
// reservations on their host) wait and go out together in the next one, as
// one nested transaction with one allocation put and a claim, status and
// event per VM. Ten creates on one host thus cost two or three commits
// instead of ten in a row, and nothing waits on a timer: the next commit
// starts when the one before it returns. Lanes of different hosts meet in
// the batcher (batch.go), which sends them in one etcd transaction.
//
// The group's transaction compares the host allocation's mod revision and
// every VM's status revision, so it is all or nothing. When it fails, each
// VM decides again on the refreshed view and commits on its own (solo), so
// one VM that changed meanwhile cannot keep failing the others.

// placeOutcome is how a placement's commit ended.
type placeOutcome int

const (
	// placed: committed.
	placed placeOutcome = iota
	// lostRace: a compare failed; fresh holds the VM's status read then.
	lostRace
	// overflowed: the host's allocation at commit time left no room for
	// it beside the placements before it in the group (the view moved
	// since the decision); decide again.
	overflowed
)

type laneRequest struct {
	r snapshot.Reservation
	p store.Placement
	// solo: commit alone, not in a group (after the VM's group lost).
	solo bool
	done chan laneResult
}

type laneResult struct {
	outcome placeOutcome
	// grouped: committed (or failed) together with other placements.
	grouped bool
	fresh   store.StatusAt
	err     error
}

type lanes struct {
	snap  *snapshot.Snapshot
	batch *batcher
	mu    sync.Mutex
	// waiting holds, per host with a lane running, the placements for the
	// host's next commit.
	waiting map[string][]*laneRequest
}

func newLanes(snap *snapshot.Snapshot, b *batcher) *lanes {
	return &lanes{snap: snap, batch: b, waiting: map[string][]*laneRequest{}}
}

// place commits p, decided as reservation r, in its host's lane and waits
// for the outcome. The reservation is ended (confirmed or aborted) before
// place returns, after the view of the host has been updated.
func (l *lanes) place(ctx context.Context, r snapshot.Reservation, p store.Placement, solo bool) laneResult {
	req := &laneRequest{r: r, p: p, solo: solo, done: make(chan laneResult, 1)}
	l.mu.Lock()
	q, running := l.waiting[r.Host]
	l.waiting[r.Host] = append(q, req)
	l.mu.Unlock()
	if !running {
		go l.run(ctx, r.Host)
	}
	select {
	case res := <-req.done:
		return res
	case <-ctx.Done():
		// The lane still ends the reservation when its commit returns.
		return laneResult{err: ctx.Err()}
	}
}

// run commits host's waiting placements until none are left.
func (l *lanes) run(ctx context.Context, host string) {
	for {
		l.mu.Lock()
		reqs := l.waiting[host]
		if len(reqs) == 0 {
			delete(l.waiting, host)
			l.mu.Unlock()
			return
		}
		l.waiting[host] = reqs[:0:0]
		l.mu.Unlock()
		var group []*laneRequest
		for _, req := range reqs {
			if req.solo {
				l.commit(ctx, host, []*laneRequest{req})
			} else {
				group = append(group, req)
			}
		}
		if len(group) > 0 {
			l.commit(ctx, host, group)
		}
	}
}

// commit sends reqs as one transaction on the host's allocation as the
// view holds it now, taking only the placements that fit on it. Those that
// do not are told after the commit, so that they decide again on a view
// that holds its outcome.
func (l *lanes) commit(ctx context.Context, host string, reqs []*laneRequest) {
	alloc, allocRev, limits, ok := l.snap.CommitBase(host)
	var fit, over []*laneRequest
	used := placement.ResourcesFromProto(alloc.GetAllocated())
	for _, req := range reqs {
		if next := used.Add(req.r.Resources); ok && next.Fits(limits) {
			used = next
			fit = append(fit, req)
		} else {
			over = append(over, req)
		}
	}
	defer func() {
		for _, req := range over {
			l.snap.Abort(req.r)
			req.done <- laneResult{outcome: overflowed}
		}
	}()
	if len(fit) == 0 {
		return
	}
	grouped := len(fit) > 1
	endAll := func(res laneResult) {
		for _, req := range fit {
			l.snap.Abort(req.r)
			req.done <- res
		}
	}
	hp := store.HostPlacements{Alloc: alloc, AllocModRevision: allocRev, VMs: make([]store.Placement, len(fit))}
	for i, req := range fit {
		hp.VMs[i] = req.p
	}
	txn, next, err := store.PlaceVMsTxn(hp)
	if err != nil {
		endAll(laneResult{err: err, grouped: grouped})
		return
	}
	res := l.batch.submit(ctx, txn)
	if res.err != nil {
		endAll(laneResult{err: res.err, grouped: grouped})
		return
	}
	if res.resp.GetSucceeded() {
		for _, req := range fit {
			l.snap.Confirm(req.r, next, req.p.Claim, res.rev)
			req.done <- laneResult{outcome: placed, grouped: grouped}
		}
		return
	}
	fresh, err := store.PlaceConflictOf(res.resp)
	if err == nil && len(fresh.Statuses) != len(fit) {
		err = fmt.Errorf("placement conflict on host %s: %d status reads for %d placements", host, len(fresh.Statuses), len(fit))
	}
	if err != nil {
		endAll(laneResult{err: err, grouped: grouped})
		return
	}
	// Refresh before the reservations end, so that no decision is made on
	// the stale view of the host in between.
	l.snap.RefreshHost(host, fresh.Alloc, fresh.Claims, res.rev)
	for i, req := range fit {
		l.snap.Abort(req.r)
		req.done <- laneResult{outcome: lostRace, grouped: grouped, fresh: fresh.Statuses[i]}
	}
}
