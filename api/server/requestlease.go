package server

import (
	"context"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Request ids are remembered for at least requestIDTTL. Granting a lease
// per create would double the etcd writes of a create, so creates share
// one lease for leaseReuse; a request id thus lives between 24h and
// 24h+leaseReuse.
const (
	requestIDTTL = 24 * time.Hour
	leaseReuse   = 10 * time.Minute
)

// requestLeases hands out the shared lease of request-id keys.
type requestLeases struct {
	lease   clientv3.Lease
	mu      sync.Mutex
	id      clientv3.LeaseID
	granted time.Time
}

func (l *requestLeases) get(ctx context.Context) (clientv3.LeaseID, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.id != 0 && time.Since(l.granted) < leaseReuse {
		return l.id, nil
	}
	resp, err := l.lease.Grant(ctx, int64((requestIDTTL+leaseReuse)/time.Second))
	if err != nil {
		return 0, errdefs.Wrap(errdefs.KindUnavailable, err, "grant request-id lease")
	}
	l.id, l.granted = resp.ID, time.Now()
	return l.id, nil
}

// forget drops a lease etcd no longer knows (e.g. revoked by an operator).
func (l *requestLeases) forget(id clientv3.LeaseID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.id == id {
		l.id = 0
	}
}
