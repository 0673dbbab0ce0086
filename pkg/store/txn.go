package store

import (
	"context"
	"slices"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Txn is one write protocol's etcd transaction, built but not yet sent: If
// are its compares, Then its writes, Else what it reads when a compare
// fails (to decide again on fresh values), Events the event-log appends
// that Commit turns into more compares and writes (events.go). Each write
// protocol of this package builds exactly one; one that builds on another's
// keeps its Events.
type Txn struct {
	If     []clientv3.Cmp
	Then   []clientv3.Op
	Else   []clientv3.Op
	Events []EventAppend
	// Usage, if set, is a project's usage as the transaction writes it
	// (its UsageRev is 0: the commit's revision is not known before):
	// whoever keeps that project's usage (api/server/createbatch.go)
	// takes it once the transaction committed, instead of reading it.
	Usage *UsageState
}

// Commit sends t. ok is false when a compare failed (re-read and retry);
// err is only for etcd failures.
func (t Txn) Commit(ctx context.Context, kv clientv3.KV) (rev int64, ok bool, err error) {
	resolved, err := resolveEvents(ctx, kv, []Txn{t})
	if err != nil {
		return 0, false, err
	}
	t = resolved[0]
	resp, err := kv.Txn(ctx).If(t.If...).Then(t.Then...).Else(t.Else...).Commit()
	if err != nil {
		return 0, false, errdefs.Wrap(errdefs.KindUnavailable, err, "etcd txn")
	}
	return resp.Header.Revision, resp.Succeeded, nil
}

// op is t, its Events resolved, as a nested transaction: each checks its
// own compares and runs its own Then or Else.
func (t Txn) op() clientv3.Op { return clientv3.OpTxn(t.If, t.Then, t.Else) }

// Reads is a set of gets sent as one read-only transaction (one round trip,
// one consistent snapshot). Each Get returns a handle that names its result,
// so nobody reads responses by position.
type Reads struct {
	ops  []clientv3.Op
	resp *clientv3.TxnResponse
}

// Read is the handle of one get of a Reads.
type Read struct {
	r *Reads
	i int
}

// Get adds a get of key (with opts, e.g. clientv3.WithPrefix()).
func (r *Reads) Get(key string, opts ...clientv3.OpOption) Read {
	return r.Add(clientv3.OpGet(key, opts...))
}

// Grow makes room for n more gets without reallocating (a create's read
// knows how many it sends).
func (r *Reads) Grow(n int) { r.ops = slices.Grow(r.ops, n) }

// Add adds a get built elsewhere (e.g. ipam.UsedOp).
func (r *Reads) Add(get clientv3.Op) Read {
	r.ops = append(r.ops, get)
	return Read{r: r, i: len(r.ops) - 1}
}

// Do sends the gets.
func (r *Reads) Do(ctx context.Context, kv clientv3.KV) error {
	resp, err := ReadTxn(ctx, kv, r.ops...)
	if err != nil {
		return err
	}
	r.resp = resp
	return nil
}

// Revision is the revision the reads saw.
func (r *Reads) Revision() int64 { return r.resp.Header.Revision }

func (h Read) rangeResp() *etcdserverpb.RangeResponse {
	return h.r.resp.Responses[h.i].GetResponseRange()
}

// KVs is what the get found.
func (h Read) KVs() []*mvccpb.KeyValue { return h.rangeResp().GetKvs() }

// Count is how many keys the get matched (with clientv3.WithCountOnly too).
func (h Read) Count() int64 { return h.rangeResp().GetCount() }

// Succeeded says whether the compares of a nested transaction (a read
// added as clientv3.OpTxn) held.
func (h Read) Succeeded() bool {
	return h.r.resp.Responses[h.i].GetResponseTxn().GetSucceeded()
}

// First is the first key found, or nil.
func (h Read) First() *mvccpb.KeyValue {
	if kvs := h.KVs(); len(kvs) > 0 {
		return kvs[0]
	}
	return nil
}

// CommitNested sends txns as the nested transactions of one transaction
// (one round trip, one raft entry, one disk sync): each checks its own
// compares and runs its own Then or Else, so one that lost a race fails
// alone. Nested transactions must not write the same key. resps[i] is
// txns[i]'s response; rev the revision of the whole commit.
func CommitNested(ctx context.Context, kv clientv3.KV, txns []Txn) (resps []*etcdserverpb.TxnResponse, rev int64, err error) {
	txns, err = resolveEvents(ctx, kv, txns)
	if err != nil {
		return nil, 0, err
	}
	ops := make([]clientv3.Op, len(txns))
	for i, t := range txns {
		ops[i] = t.op()
	}
	resp, err := kv.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return nil, 0, errdefs.Wrap(errdefs.KindUnavailable, err, "etcd txn of %d nested transactions", len(txns))
	}
	resps = make([]*etcdserverpb.TxnResponse, len(txns))
	for i := range txns {
		resps[i] = resp.Responses[i].GetResponseTxn()
	}
	return resps, resp.Header.Revision, nil
}
