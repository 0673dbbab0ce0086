package scheduler

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Group commit. Every placement is one guarded transaction; committing each
// on its own costs a round trip, a raft entry and a disk sync per VM. The
// committer folds the transactions that workers submit at the same time into
// one (all compares, all ops), as a database's group commit does. This is
// safe because one replica never has two claims in flight on the same host
// (placement.InFlight) or for the same VM (the queue), so the folded
// compares are independent. If the folded transaction fails — another
// replica or the API changed one of the keys — nothing was written and each
// placement is retried on its own, where its Else branch reads the fresh
// values.

// maxBatch keeps a folded transaction under etcd's default --max-txn-ops
// (128): a placement has 4 puts and 3 compares.
const maxBatch = 32

// committers is how many folded transactions may be in flight at once.
const committers = 4

type commitRequest struct {
	cmps []clientv3.Cmp
	ops  []clientv3.Op
	done chan commitResult
}

type commitResult struct {
	// committed: the placement is in etcd at revision rev. Otherwise, if
	// err is nil, the folded transaction failed and the caller must retry
	// on its own.
	committed bool
	rev       int64
	err       error
}

type batcher struct {
	kv clientv3.KV
	in chan commitRequest
}

func newBatcher(kv clientv3.KV) *batcher {
	return &batcher{kv: kv, in: make(chan commitRequest)}
}

// run commits until ctx ends.
func (b *batcher) run(ctx context.Context) {
	for {
		var first commitRequest
		select {
		case <-ctx.Done():
			return
		case first = <-b.in:
		}
		batch := []commitRequest{first}
	drain:
		for len(batch) < maxBatch {
			select {
			case r := <-b.in:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		b.commit(ctx, batch)
	}
}

func (b *batcher) commit(ctx context.Context, batch []commitRequest) {
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for _, r := range batch {
		cmps = append(cmps, r.cmps...)
		ops = append(ops, r.ops...)
	}
	resp, err := b.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	res := commitResult{err: err}
	if err == nil && resp.Succeeded {
		res = commitResult{committed: true, rev: resp.Header.Revision}
	}
	for _, r := range batch {
		r.done <- res
	}
}

// submit hands a placement's transaction to the committer and waits.
func (b *batcher) submit(ctx context.Context, cmps []clientv3.Cmp, ops []clientv3.Op) commitResult {
	r := commitRequest{cmps: cmps, ops: ops, done: make(chan commitResult, 1)}
	select {
	case b.in <- r:
	case <-ctx.Done():
		return commitResult{err: ctx.Err()}
	}
	select {
	case res := <-r.done:
		return res
	case <-ctx.Done():
		return commitResult{err: ctx.Err()}
	}
}
