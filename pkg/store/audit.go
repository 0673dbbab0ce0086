package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// AuditRetention is how long audit records stay: their keys are leased, so
// the log cannot grow etcd without bound (the write rate of the API bounds
// what a retention holds).
const AuditRetention = 30 * 24 * time.Hour

// AuditLog appends audit records. Records written within one hour share a
// lease (one lease per hour of records, not one per record).
//
// Every mutating API call appends one record, so at a few hundred calls a
// second the records were as many etcd writes as the calls' own
// transactions. Appends are group-committed: while one transaction of
// records is in flight, the next records queue and go together in the
// following one (at most maxAuditBatch), and each Append still returns
// only once its record is stored or has failed.
type AuditLog struct {
	cli Leaser

	mu        sync.Mutex
	lease     clientv3.LeaseID
	leaseFrom time.Time

	qmu     sync.Mutex
	queue   []auditPut
	running bool
}

// auditPut is one queued record and where its result goes.
type auditPut struct {
	op   clientv3.Op
	done chan error
}

// maxAuditBatch bounds the puts of one transaction (etcd refuses more
// than 128 operations in one by default).
const maxAuditBatch = 100

// auditCommitTimeout bounds one batch's write; a batch writes for several
// callers, so it uses none of their contexts.
const auditCommitTimeout = 30 * time.Second

// NewAuditLog writes through cli.
func NewAuditLog(cli Leaser) *AuditLog { return &AuditLog{cli: cli} }

// Append stores rec under a key that sorts by time.
func (l *AuditLog) Append(ctx context.Context, rec *minicloudv1.AuditRecord) error {
	op, err := l.Op(ctx, rec)
	if err != nil {
		return err
	}
	p := auditPut{op: op, done: make(chan error, 1)}
	l.qmu.Lock()
	l.queue = append(l.queue, p)
	if !l.running {
		l.running = true
		go l.commitQueue()
	}
	l.qmu.Unlock()
	select {
	case err := <-p.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Op is the put that stores rec, for a transaction of the caller's own
// (a VM create writes its record with the VM: NewVM.Records). If that
// transaction fails because the lease is gone, Forget it.
func (l *AuditLog) Op(ctx context.Context, rec *minicloudv1.AuditRecord) (clientv3.Op, error) {
	lease, err := l.leaseFor(ctx, rec.GetTime().AsTime())
	if err != nil {
		return clientv3.Op{}, err
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	key := fmt.Sprintf("%s%020d-%s", AuditPrefix, rec.GetTime().AsTime().UnixNano(), hex.EncodeToString(b))
	return PutOp(key, rec, clientv3.WithLease(lease))
}

// Forget drops the lease the records are written under (revoked, or
// expired while etcd was down), so the next record gets a new one.
func (l *AuditLog) Forget() {
	l.mu.Lock()
	l.lease = 0
	l.mu.Unlock()
}

// commitQueue writes the queued records, a batch per transaction, until
// the queue is empty.
func (l *AuditLog) commitQueue() {
	for {
		l.qmu.Lock()
		batch := l.queue[:min(len(l.queue), maxAuditBatch)]
		l.queue = l.queue[len(batch):]
		if len(batch) == 0 {
			l.queue, l.running = nil, false
			l.qmu.Unlock()
			return
		}
		l.qmu.Unlock()
		ops := make([]clientv3.Op, len(batch))
		for i, p := range batch {
			ops[i] = p.op
		}
		ctx, cancel := context.WithTimeout(context.Background(), auditCommitTimeout)
		_, err := l.cli.Txn(ctx).Then(ops...).Commit()
		cancel()
		if err != nil {
			err = errdefs.Wrap(errdefs.KindUnavailable, err, "write audit record (one of %d written together)", len(batch))
		}
		for _, p := range batch {
			p.done <- err
		}
	}
}

func (l *AuditLog) leaseFor(ctx context.Context, t time.Time) (clientv3.LeaseID, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lease != 0 && t.Sub(l.leaseFrom) < time.Hour {
		return l.lease, nil
	}
	// The lease outlives the hour's last record by the retention.
	id, err := leaseUntil(ctx, l.cli, t.Add(AuditRetention+time.Hour))
	if err != nil {
		return 0, err
	}
	l.lease, l.leaseFrom = id, t
	return id, nil
}

// ListAudit returns up to limit records, newest first, of project (all
// when ""). It reads newest first in pages and stops after scanning
// maxScan records, so a filter that matches little costs a bounded read.
func ListAudit(ctx context.Context, kv clientv3.KV, project string, limit, maxScan int) ([]*minicloudv1.AuditRecord, error) {
	var out []*minicloudv1.AuditRecord
	end := clientv3.GetPrefixRangeEnd(AuditPrefix)
	scanned := 0
	for len(out) < limit && scanned < maxScan {
		page := min(500, maxScan-scanned)
		resp, err := kv.Get(ctx, AuditPrefix, clientv3.WithRange(end), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend), clientv3.WithLimit(int64(page)))
		if err != nil {
			return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "read audit log")
		}
		for _, kv := range resp.Kvs {
			rec := &minicloudv1.AuditRecord{}
			if err := Decode(kv, rec); err != nil {
				return nil, err
			}
			if (project == "" || rec.GetProject() == project) && len(out) < limit {
				out = append(out, rec)
			}
		}
		scanned += len(resp.Kvs)
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		end = string(resp.Kvs[len(resp.Kvs)-1].Key) // exclusive: the next page is older
	}
	return out, nil
}
