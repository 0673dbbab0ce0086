package store

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// The write protocols of the cluster PKI (docs/security.md): the CA, join
// tokens, the certificates issued to hosts and the revocation deny-list.
// Each is one transaction.

// pkiTxnAttempts bounds the retries of a transaction that lost a race.
const pkiTxnAttempts = 8

// LoadOrCreateCA returns the cluster CA, creating it with create when etcd
// holds none. API replicas that start together each make a candidate; one
// create-if-absent transaction keeps the first and hands it back to the
// others, so every replica ends up with the same CA.
func LoadOrCreateCA(ctx context.Context, kv clientv3.KV, create func() (*minicloudv1.ClusterCA, error)) (*minicloudv1.ClusterCA, error) {
	ca := &minicloudv1.ClusterCA{}
	if _, err := Get(ctx, kv, CAKey, ca); err == nil {
		return ca, nil
	} else if !errdefs.IsNotFound(err) {
		return nil, err
	}
	fresh, err := create()
	if err != nil {
		return nil, err
	}
	op, err := PutOp(CAKey, fresh)
	if err != nil {
		return nil, err
	}
	resp, err := kv.Txn(ctx).If(Absent(CAKey)).Then(op).Else(clientv3.OpGet(CAKey)).Commit()
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "store cluster CA")
	}
	if resp.Succeeded {
		return fresh, nil
	}
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	if len(kvs) == 0 {
		return nil, errdefs.Internal("cluster CA vanished while being created")
	}
	if err := Decode(kvs[0], ca); err != nil {
		return nil, err
	}
	return ca, nil
}

// Leaser grants leases (a *clientv3.Client is one).
type Leaser interface {
	clientv3.KV
	Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error)
}

// leaseUntil grants a lease that ends at t (at least a minute from now):
// join tokens and deny-list entries vanish by themselves once they no
// longer matter, so neither list grows without bound.
func leaseUntil(ctx context.Context, cli Leaser, t time.Time) (clientv3.LeaseID, error) {
	ttl := max(int64(time.Until(t)/time.Second)+1, 60)
	grant, err := cli.Grant(ctx, ttl)
	if err != nil {
		return 0, errdefs.Wrap(errdefs.KindUnavailable, err, "grant lease")
	}
	return grant.ID, nil
}

// MaxJoinTokens bounds the live (unused, unexpired) join tokens.
const MaxJoinTokens = 100

// CreateJoinToken stores a join token under id, leased until it expires.
// It fails with AlreadyExists if the id is taken or another token was
// made meanwhile (the caller draws again), ResourceExhausted when
// MaxJoinTokens are live.
func CreateJoinToken(ctx context.Context, cli Leaser, id string, tok *minicloudv1.JoinToken) error {
	var r Reads
	live := r.Get(JoinTokenPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err := r.Do(ctx, cli); err != nil {
		return err
	}
	if live.Count() >= MaxJoinTokens {
		return errdefs.ResourceExhausted("%d join tokens are live, the most allowed: delete unused ones (minicloud host join-token list / delete) or let them expire", live.Count())
	}
	lease, err := leaseUntil(ctx, cli, tok.GetExpireTime().AsTime())
	if err != nil {
		return err
	}
	op, err := PutOp(JoinTokenKey(id), tok, clientv3.WithLease(lease))
	if err != nil {
		return err
	}
	_, ok, err := Commit(ctx, cli, []clientv3.Cmp{Absent(JoinTokenKey(id)), UnchangedSince(JoinTokenPrefix, r.Revision())}, []clientv3.Op{op})
	if err != nil {
		return err
	}
	if !ok {
		return errdefs.AlreadyExists("join token id %s is taken, or another token was made meanwhile", id)
	}
	return nil
}

// JoinState is what a join reads before it decides: the token, the
// host's live certificates and whether the host is alive, in one snapshot.
type JoinState struct {
	Token    *minicloudv1.JoinToken // nil: no such token (never made, used, or expired)
	TokenRev int64
	Certs    []Object[*minicloudv1.IssuedCert]
	Alive    bool
	Rev      int64
}

// ReadJoin reads the join state of token id and host.
func ReadJoin(ctx context.Context, kv clientv3.KV, id, host string) (*JoinState, error) {
	resp, err := ReadTxn(ctx, kv,
		clientv3.OpGet(JoinTokenKey(id)),
		clientv3.OpGet(HostCertsPrefix(host), clientv3.WithPrefix()),
		clientv3.OpGet(HostAliveKey(host), clientv3.WithCountOnly()))
	if err != nil {
		return nil, err
	}
	st := &JoinState{Rev: resp.Header.Revision, Alive: resp.Responses[2].GetResponseRange().GetCount() > 0}
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
		st.Token = &minicloudv1.JoinToken{}
		if err := Decode(kvs[0], st.Token); err != nil {
			return nil, err
		}
		st.TokenRev = kvs[0].ModRevision
	}
	st.Certs, err = DecodeAll(resp.Responses[1].GetResponseRange().GetKvs(), func() *minicloudv1.IssuedCert { return &minicloudv1.IssuedCert{} })
	if err != nil {
		return nil, err
	}
	return st, nil
}

// CommitJoin spends join token id and records cert as the host's one live
// certificate, moving the host's earlier certificates to the deny-list, in
// one transaction that holds only if nothing changed since st was read: the
// token is unspent, no other join of the host got in, and the host is
// still not alive. ok is false when that did not hold (read again).
func CommitJoin(ctx context.Context, cli Leaser, id string, st *JoinState, cert *minicloudv1.IssuedCert) (ok bool, err error) {
	host := cert.GetHost()
	cmps := []clientv3.Cmp{
		Unchanged(JoinTokenKey(id), st.TokenRev),
		UnchangedSince(HostCertsPrefix(host), st.Rev),
		Absent(HostAliveKey(host)),
	}
	ops, err := revokeOps(ctx, cli, st.Certs)
	if err != nil {
		return false, err
	}
	put, err := PutOp(HostCertKey(host, cert.GetSerial()), cert)
	if err != nil {
		return false, err
	}
	ops = append(ops, clientv3.OpDelete(JoinTokenKey(id)), put)
	_, ok, err = Commit(ctx, cli, cmps, ops)
	return ok, err
}

// revokeOps moves certs to the deny-list (leased until the last of them
// expires: an expired certificate is refused by TLS anyway).
func revokeOps(ctx context.Context, cli Leaser, certs []Object[*minicloudv1.IssuedCert]) ([]clientv3.Op, error) {
	if len(certs) == 0 {
		return nil, nil
	}
	var last time.Time
	for _, c := range certs {
		if t := c.Value.GetNotAfter().AsTime(); t.After(last) {
			last = t
		}
	}
	lease, err := leaseUntil(ctx, cli, last)
	if err != nil {
		return nil, err
	}
	now := timestamppb.Now()
	var ops []clientv3.Op
	for _, c := range certs {
		c.Value.RevokeTime = now
		put, err := PutOp(RevokedKey(c.Value.GetSerial()), c.Value, clientv3.WithLease(lease))
		if err != nil {
			return nil, err
		}
		ops = append(ops, put, clientv3.OpDelete(c.Key))
	}
	return ops, nil
}

// RevokeHost moves every live certificate of host to the deny-list and
// ends its liveness, in one transaction. It returns the revoked serials;
// NotFound if the host holds no certificate.
func RevokeHost(ctx context.Context, cli Leaser, host string) ([]string, error) {
	for range pkiTxnAttempts {
		certs, rev, err := List(ctx, cli, HostCertsPrefix(host), func() *minicloudv1.IssuedCert { return &minicloudv1.IssuedCert{} })
		if err != nil {
			return nil, err
		}
		if len(certs) == 0 {
			return nil, errdefs.NotFound("host %s holds no certificate: it never joined, or was revoked already", host)
		}
		ops, err := revokeOps(ctx, cli, certs)
		if err != nil {
			return nil, err
		}
		ops = append(ops, clientv3.OpDelete(HostAliveKey(host)))
		_, ok, err := Commit(ctx, cli, []clientv3.Cmp{UnchangedSince(HostCertsPrefix(host), rev)}, ops)
		if err != nil {
			return nil, err
		}
		if ok {
			serials := make([]string, 0, len(certs))
			for _, c := range certs {
				serials = append(serials, c.Value.GetSerial())
			}
			return serials, nil
		}
	}
	return nil, errdefs.Conflict("revoke host %s: too much contention, try again", host)
}

// IsRevoked says whether serial is on the deny-list.
func IsRevoked(ctx context.Context, kv clientv3.KV, serial string) (bool, error) {
	resp, err := kv.Get(ctx, RevokedKey(serial), clientv3.WithCountOnly())
	if err != nil {
		return false, errdefs.Wrap(errdefs.KindUnavailable, err, "read certificate deny-list")
	}
	return resp.Count > 0, nil
}

// DeleteJoinToken removes join token id; NotFound if there is none.
func DeleteJoinToken(ctx context.Context, kv clientv3.KV, id string) error {
	resp, err := kv.Delete(ctx, JoinTokenKey(id))
	if err != nil {
		return errdefs.Wrap(errdefs.KindUnavailable, err, "delete join token %s", id)
	}
	if resp.Deleted == 0 {
		return errdefs.NotFound("join token %s does not exist: it was used, expired or deleted (see `minicloud host join-token list`)", id)
	}
	return nil
}
