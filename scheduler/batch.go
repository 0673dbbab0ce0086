package scheduler

import (
	"context"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/store"
)

// Group commit. Every placement is one guarded transaction; sent alone, each
// costs a round trip, a raft entry and a disk sync. The committer sends the
// placements that workers submit at the same time as one etcd transaction
// made of nested transactions, one per placement: each nested transaction
// checks its own compares and runs its own Then or Else, so a placement that
// lost a race fails alone (and its Else reads the fresh values) while the
// others commit. Nested puts must not touch the same key; they never do,
// because one replica has at most one commit per host in flight (its lane,
// lane.go, which groups that host's placements) and one placement per VM
// (the queue).

// maxBatch bounds the nested transactions per commit (etcd's default
// --max-txn-ops, 128, applies to each level).
const maxBatch = 64

// committers is how many batched transactions may be in flight at once.
const committers = 4

type commitRequest struct {
	txn  store.Txn
	done chan commitResult
}

type commitResult struct {
	// resp is the placement's own (nested) transaction response; rev is
	// the revision of the whole commit.
	resp *etcdserverpb.TxnResponse
	rev  int64
	err  error
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
	txns := make([]store.Txn, len(batch))
	for i, r := range batch {
		txns[i] = r.txn
	}
	resps, rev, err := store.CommitNested(ctx, b.kv, txns)
	for i, r := range batch {
		if err != nil {
			r.done <- commitResult{err: err}
			continue
		}
		r.done <- commitResult{resp: resps[i], rev: rev}
	}
}

// submit hands a placement's transaction to a committer and waits for its
// outcome.
func (b *batcher) submit(ctx context.Context, txn store.Txn) commitResult {
	r := commitRequest{txn: txn, done: make(chan commitResult, 1)}
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
