package store

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// ListIdentityKeys returns the stored workload identity keys and the
// revision of the read (for CreateIdentityKey).
func ListIdentityKeys(ctx context.Context, kv clientv3.KV) ([]Object[*minicloudv1.IdentityKey], int64, error) {
	return List(ctx, kv, IdentityKeyPrefix, func() *minicloudv1.IdentityKey { return &minicloudv1.IdentityKey{} })
}

// CreateIdentityKey stores key, leased until publishUntil (when every token
// it signed has expired, etcd drops it and it leaves the published set), if
// no identity key was written since rev. API replicas that decide together
// that a key is due each make a candidate; this compare keeps the first and
// the others (ok false) read again and use it, so the replicas never sign
// with keys the others do not know.
func CreateIdentityKey(ctx context.Context, cli Leaser, key *minicloudv1.IdentityKey, rev int64, publishUntil time.Time) (ok bool, err error) {
	lease, err := leaseUntil(ctx, cli, publishUntil)
	if err != nil {
		return false, err
	}
	put, err := PutOp(IdentityKeyKey(key.GetKid()), key, clientv3.WithLease(lease))
	if err != nil {
		return false, err
	}
	_, ok, err = Commit(ctx, cli, []clientv3.Cmp{UnchangedSince(IdentityKeyPrefix, rev), Absent(IdentityKeyKey(key.GetKid()))}, []clientv3.Op{put})
	if err != nil {
		return false, err
	}
	if r, canRevoke := cli.(leaseRevoker); !ok && canRevoke {
		// The lease holds nothing: do not leave it to run out.
		_, _ = r.Revoke(ctx, lease)
	}
	return ok, nil
}

type leaseRevoker interface {
	Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error)
}
