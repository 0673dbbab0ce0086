package store

import (
	"context"
	"fmt"
	"unsafe"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Object is one decoded value with the revisions optimistic updates compare.
type Object[T proto.Message] struct {
	Key            string
	Value          T
	CreateRevision int64
	ModRevision    int64
}

// Marshal encodes m for etcd.
func Marshal(m proto.Message) (string, error) {
	b, err := proto.Marshal(m)
	if err != nil {
		return "", fmt.Errorf("encode %T: %w", m, err)
	}
	if len(b) == 0 {
		return "", nil
	}
	// The string is b itself, not a copy: b is this call's and nothing
	// writes to it after. Every value a write puts went through a copy
	// here and another into the op (clientv3.OpPut), ~3 KB per VM create.
	return unsafe.String(unsafe.SliceData(b), len(b)), nil
}

// Decode decodes the value of kv into m.
func Decode(kv *mvccpb.KeyValue, m proto.Message) error {
	if err := proto.Unmarshal(kv.Value, m); err != nil {
		return fmt.Errorf("decode %s as %T: %w", kv.Key, m, err)
	}
	return nil
}

// PutOp returns the op that stores m at key.
func PutOp(key string, m proto.Message, opts ...clientv3.OpOption) (clientv3.Op, error) {
	v, err := Marshal(m)
	if err != nil {
		return clientv3.Op{}, err
	}
	return clientv3.OpPut(key, v, opts...), nil
}

// Get reads key into m and returns its mod revision. A missing key is an
// errdefs NotFound error naming the key; callers wrap it with the resource.
func Get(ctx context.Context, kv clientv3.KV, key string, m proto.Message, opts ...clientv3.OpOption) (int64, error) {
	resp, err := kv.Get(ctx, key, opts...)
	if err != nil {
		return 0, errdefs.Wrap(errdefs.KindUnavailable, err, "etcd get %s", key)
	}
	if len(resp.Kvs) == 0 {
		return 0, errdefs.NotFound("%s not found", key)
	}
	return resp.Kvs[0].ModRevision, Decode(resp.Kvs[0], m)
}

// List decodes every value under prefix, in key order, and returns the
// revision of the read.
func List[T proto.Message](ctx context.Context, kv clientv3.KV, prefix string, newT func() T, opts ...clientv3.OpOption) ([]Object[T], int64, error) {
	resp, err := kv.Get(ctx, prefix, append([]clientv3.OpOption{clientv3.WithPrefix()}, opts...)...)
	if err != nil {
		return nil, 0, errdefs.Wrap(errdefs.KindUnavailable, err, "etcd list %s", prefix)
	}
	out, err := DecodeAll(resp.Kvs, newT)
	return out, resp.Header.Revision, err
}

// DecodeAll decodes kvs into objects.
func DecodeAll[T proto.Message](kvs []*mvccpb.KeyValue, newT func() T) ([]Object[T], error) {
	out := make([]Object[T], 0, len(kvs))
	for _, kv := range kvs {
		v := newT()
		if err := Decode(kv, v); err != nil {
			return nil, err
		}
		out = append(out, Object[T]{Key: string(kv.Key), Value: v, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision})
	}
	return out, nil
}

// DecodeByName decodes kvs into a map keyed by each key's last segment
// (a host's or a project's name).
func DecodeByName[T proto.Message](kvs []*mvccpb.KeyValue, newT func() T) (map[string]T, error) {
	out := make(map[string]T, len(kvs))
	for _, kv := range kvs {
		v := newT()
		if err := Decode(kv, v); err != nil {
			return nil, err
		}
		out[LastSegment(string(kv.Key))] = v
	}
	return out, nil
}

// Absent holds when key does not exist.
func Absent(key string) clientv3.Cmp {
	return revisionCmp(clientv3.CreateRevision(key), etcdserverpb.Compare_EQUAL, 0)
}

// Exists holds when key exists.
func Exists(key string) clientv3.Cmp {
	return revisionCmp(clientv3.CreateRevision(key), etcdserverpb.Compare_GREATER, 0)
}

// Unchanged holds when key was last written at modRev; modRev 0 means the
// key must still be absent.
func Unchanged(key string, modRev int64) clientv3.Cmp {
	if modRev == 0 {
		return Absent(key)
	}
	return revisionCmp(clientv3.ModRevision(key), etcdserverpb.Compare_EQUAL, modRev)
}

// revisionCmp is clientv3.Compare(c, result, rev) for c of a create or mod
// revision, without the copy clientv3.Compare makes of c first: that is a
// reflective proto.Clone (three allocations and a walk of the message) per
// compare, ~8 compares per VM create, for a c that is fresh and ours to
// set.
func revisionCmp(c clientv3.Cmp, result etcdserverpb.Compare_CompareResult, rev int64) clientv3.Cmp {
	pc := c.GetCompare()
	pc.Result = result
	switch pc.Target {
	case etcdserverpb.Compare_CREATE:
		pc.TargetUnion = &etcdserverpb.Compare_CreateRevision{CreateRevision: rev}
	case etcdserverpb.Compare_MOD:
		pc.TargetUnion = &etcdserverpb.Compare_ModRevision{ModRevision: rev}
	default:
		panic(fmt.Sprintf("revisionCmp of target %v", pc.Target))
	}
	return c
}

// UnchangedSince holds when no key under prefix was written after rev. A
// delete that scanned a prefix at rev (e.g. "no VM uses this flavor") uses
// it so that a concurrent create cannot slip in between scan and delete.
func UnchangedSince(prefix string, rev int64) clientv3.Cmp {
	return clientv3.Compare(clientv3.ModRevision(prefix), "<", rev+1).WithPrefix()
}

// Commit runs one transaction. ok is false when a compare failed; err is
// only for etcd failures.
func Commit(ctx context.Context, kv clientv3.KV, cmps []clientv3.Cmp, ops []clientv3.Op) (rev int64, ok bool, err error) {
	return Txn{If: cmps, Then: ops}.Commit(ctx, kv)
}

// ReadTxn runs ops (gets) in one read-only transaction: one round trip and
// one consistent snapshot.
func ReadTxn(ctx context.Context, kv clientv3.KV, ops ...clientv3.Op) (*clientv3.TxnResponse, error) {
	resp, err := kv.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "etcd read")
	}
	return resp, nil
}
