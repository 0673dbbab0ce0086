package main

import (
	"context"
	"sync/atomic"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// etcdCounts counts the etcd calls the API server makes.
type etcdCounts struct {
	requests    atomic.Int64 // every KV call
	writeTxns   atomic.Int64 // committed transactions with a put or delete
	failedTxns  atomic.Int64 // of those, how many failed their compares
	leaseGrants atomic.Int64
}

type countsSnapshot struct{ requests, writeTxns, failedTxns, leaseGrants int64 }

func (c *etcdCounts) reset() {
	c.requests.Store(0)
	c.writeTxns.Store(0)
	c.failedTxns.Store(0)
	c.leaseGrants.Store(0)
}

func (c *etcdCounts) snapshot() countsSnapshot {
	return countsSnapshot{c.requests.Load(), c.writeTxns.Load(), c.failedTxns.Load(), c.leaseGrants.Load()}
}

// countingKV is a clientv3.KV that counts what passes through it.
type countingKV struct {
	clientv3.KV
	c *etcdCounts
}

func (k *countingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	k.c.requests.Add(1)
	return k.KV.Get(ctx, key, opts...)
}

func (k *countingKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	k.c.requests.Add(1)
	return k.KV.Put(ctx, key, val, opts...)
}

func (k *countingKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	k.c.requests.Add(1)
	return k.KV.Delete(ctx, key, opts...)
}

func (k *countingKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	k.c.requests.Add(1)
	return k.KV.Do(ctx, op)
}

func (k *countingKV) Txn(ctx context.Context) clientv3.Txn {
	return &countingTxn{Txn: k.KV.Txn(ctx), c: k.c}
}

type countingTxn struct {
	clientv3.Txn
	c      *etcdCounts
	writes bool
}

func (t *countingTxn) If(cs ...clientv3.Cmp) clientv3.Txn { t.Txn = t.Txn.If(cs...); return t }

func (t *countingTxn) Then(ops ...clientv3.Op) clientv3.Txn {
	t.note(ops)
	t.Txn = t.Txn.Then(ops...)
	return t
}

func (t *countingTxn) Else(ops ...clientv3.Op) clientv3.Txn {
	t.note(ops)
	t.Txn = t.Txn.Else(ops...)
	return t
}

func (t *countingTxn) note(ops []clientv3.Op) {
	for _, op := range ops {
		if op.IsPut() || op.IsDelete() {
			t.writes = true
		}
	}
}

func (t *countingTxn) Commit() (*clientv3.TxnResponse, error) {
	t.c.requests.Add(1)
	resp, err := t.Txn.Commit()
	if t.writes {
		t.c.writeTxns.Add(1)
		if err == nil && !resp.Succeeded {
			t.c.failedTxns.Add(1)
		}
	}
	return resp, err
}

// countingLease counts lease grants (request ids share leases).
type countingLease struct {
	clientv3.Lease
	c *etcdCounts
}

func (l *countingLease) Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	l.c.leaseGrants.Add(1)
	return l.Lease.Grant(ctx, ttl)
}
