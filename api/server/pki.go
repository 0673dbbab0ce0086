package server

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

// EnsureCA loads the cluster CA from etcd, creating it if this is the
// first API server of the cluster (docs/security.md says why it lives in
// etcd).
func EnsureCA(ctx context.Context, kv store.Leaser) (*pki.CA, error) {
	stored, err := store.LoadOrCreateCA(ctx, kv, func() (*minicloudv1.ClusterCA, error) {
		ca, err := pki.NewCA("minicloud cluster CA")
		if err != nil {
			return nil, err
		}
		key, err := ca.KeyPEM()
		if err != nil {
			return nil, err
		}
		return &minicloudv1.ClusterCA{CertPem: ca.CertPEM, KeyPem: key}, nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	ca, err := pki.LoadCA(stored.GetCertPem(), stored.GetKeyPem())
	if err != nil {
		return nil, fmt.Errorf("cluster CA in etcd: %w", err)
	}
	return ca, nil
}

// Join tokens: kubeadm's bootstrap-token shape, "<id>.<secret>" with a
// 6-character public id (the etcd key, safe to log) and a 16-character
// secret (about 82 bits) of which only the SHA-256 is stored.
const (
	tokenAlphabet     = "abcdefghijklmnopqrstuvwxyz0123456789"
	defaultJoinTTL    = time.Hour
	maxJoinTTL        = 7 * 24 * time.Hour
	minJoinTTL        = time.Minute
	maxJoinDescLength = 255
)

var (
	joinTokenRE   = regexp.MustCompile(`^([a-z0-9]{6})\.([a-z0-9]{16})$`)
	joinTokenIDRE = regexp.MustCompile(`^[a-z0-9]{6}$`)
)

func randomString(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random token: %w", err)
	}
	for i := range b {
		// 256 is not a multiple of 36: the bias (at most 1/256 on some
		// characters) costs well under a bit of the secret's 82.
		b[i] = tokenAlphabet[int(b[i])%len(tokenAlphabet)]
	}
	return string(b), nil
}

func hashSecret(secret string) []byte {
	sum := sha256.Sum256([]byte(secret))
	return sum[:]
}

func (h *hostService) CreateJoinToken(ctx context.Context, req *minicloudv1.CreateJoinTokenRequest) (*minicloudv1.CreateJoinTokenResponse, error) {
	if h.s.ca == nil {
		return nil, errdefs.FailedPrecondition("this API server has no cluster CA: hosts cannot join through it")
	}
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	switch {
	case ttl == 0:
		ttl = defaultJoinTTL
	case ttl < minJoinTTL || ttl > maxJoinTTL:
		return nil, errdefs.Invalid("ttl %s is out of range: give between %s and %s", ttl, minJoinTTL, maxJoinTTL)
	}
	if len(req.GetDescription()) > maxJoinDescLength {
		return nil, errdefs.Invalid("description is %d characters; keep it under %d", len(req.GetDescription()), maxJoinDescLength+1)
	}
	token, tok, err := CreateJoinToken(ctx, h.s.etcd, ttl, req.GetDescription())
	if err != nil {
		return nil, err
	}
	h.s.log.Info("join token created", "token_id", strings.SplitN(token, ".", 2)[0], "expires", tok.ExpireTime.AsTime())
	return &minicloudv1.CreateJoinTokenResponse{
		Token:      token,
		ExpireTime: tok.ExpireTime,
		CaHash:     h.s.ca.Hash(),
		CaPem:      h.s.ca.CertPEM,
	}, nil
}

// CreateJoinToken makes and stores a one-time join token valid for ttl and
// returns it ("<id>.<secret>": the only time the secret exists outside
// the caller). The all-in-one uses it directly to join its own agent.
func CreateJoinToken(ctx context.Context, cli store.Leaser, ttl time.Duration, description string) (string, *minicloudv1.JoinToken, error) {
	now := time.Now()
	for range maxTxnAttempts {
		id, err := randomString(6)
		if err != nil {
			return "", nil, err
		}
		secret, err := randomString(16)
		if err != nil {
			return "", nil, err
		}
		tok := &minicloudv1.JoinToken{
			SecretSha256: hashSecret(secret),
			ExpireTime:   timestamppb.New(now.Add(ttl)),
			CreateTime:   timestamppb.New(now),
			Description:  description,
		}
		err = store.CreateJoinToken(ctx, cli, id, tok)
		if errdefs.IsAlreadyExists(err) {
			continue
		}
		if err != nil {
			return "", nil, err
		}
		return id + "." + secret, tok, nil
	}
	return "", nil, tooMuchContention("create join token")
}

func (h *hostService) ListJoinTokens(ctx context.Context, req *minicloudv1.ListJoinTokensRequest) (*minicloudv1.ListJoinTokensResponse, error) {
	resp := &minicloudv1.ListJoinTokensResponse{}
	now := time.Now()
	var err error
	_, resp.NextPageToken, err = listPage(ctx, h.s, "jointokens", store.JoinTokenPrefix, "", req, func() *minicloudv1.JoinToken { return &minicloudv1.JoinToken{} },
		func(key string, t *minicloudv1.JoinToken) bool {
			if !now.Before(t.GetExpireTime().AsTime()) {
				return false // expired, its lease not yet run out
			}
			resp.Tokens = append(resp.Tokens, &minicloudv1.JoinTokenInfo{
				Id: store.LastSegment(key), ExpireTime: t.GetExpireTime(),
				CreateTime: t.GetCreateTime(), Description: t.GetDescription(),
			})
			return true
		})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (h *hostService) DeleteJoinToken(ctx context.Context, req *minicloudv1.DeleteJoinTokenRequest) (*minicloudv1.DeleteJoinTokenResponse, error) {
	id, _, _ := strings.Cut(req.GetId(), ".")
	if !joinTokenIDRE.MatchString(id) {
		return nil, errdefs.Invalid("join token id %q: want the 6 characters before the dot", id)
	}
	if err := store.DeleteJoinToken(ctx, h.s.etcd, id); err != nil {
		return nil, err
	}
	h.s.log.Info("join token deleted", "token_id", id)
	return &minicloudv1.DeleteJoinTokenResponse{}, nil
}

// JoinHost is kubeadm's TLS bootstrap: a valid, unspent, unexpired token
// and a CSR buy one certificate for the named host. The token is spent in
// the transaction that records the certificate; a refused join writes
// nothing.
func (h *hostService) JoinHost(ctx context.Context, req *minicloudv1.JoinHostRequest) (*minicloudv1.JoinHostResponse, error) {
	if h.s.ca == nil {
		return nil, errdefs.FailedPrecondition("this API server has no cluster CA: hosts cannot join through it")
	}
	m := joinTokenRE.FindStringSubmatch(req.GetToken())
	if m == nil {
		return nil, errdefs.Unauthenticated("join token is malformed: want <6 of [a-z0-9]>.<16 of [a-z0-9]>, as printed by `minicloud host join-token create`")
	}
	id, secret := m[1], m[2]
	name := req.GetHostName()
	if err := validateHostname("host_name", name); err != nil {
		return nil, err
	}
	csr, err := pki.ParseCSR(req.GetCsrPem())
	if err != nil {
		return nil, errdefs.Invalid("csr_pem: %v", err)
	}
	for range maxTxnAttempts {
		st, err := store.ReadJoin(ctx, h.s.etcd, id, name)
		if err != nil {
			return nil, err
		}
		if st.Token == nil || !hmac.Equal(hashSecret(secret), st.Token.GetSecretSha256()) {
			return nil, errdefs.Unauthenticated("join token %s is unknown, already used or expired: create a new one with `minicloud host join-token create`", id)
		}
		if exp := st.Token.GetExpireTime().AsTime(); !time.Now().Before(exp) {
			return nil, errdefs.Unauthenticated("join token %s expired at %s: create a new one with `minicloud host join-token create`", id, exp.UTC().Format(time.RFC3339))
		}
		if st.Alive {
			return nil, errdefs.AlreadyExists("host %s is registered and up: a second live registration of a name is refused; revoke the old one first (`minicloud host revoke %s`), or stop its agent and wait %s for its lease to end", name, name, HostLeaseTTL)
		}
		cert, err := h.s.ca.Sign(csr.PublicKey, pki.Template{
			CommonName: name, Organization: pki.OrgHosts, DNSNames: []string{name},
			Server: true, Client: true, Lifetime: pki.HostCertLifetime,
		})
		if err != nil {
			return nil, errdefs.Invalid("sign the certificate request: %v", err)
		}
		serial := pki.SerialString(cert)
		ok, err := store.CommitJoin(ctx, h.s.etcd, id, st, &minicloudv1.IssuedCert{
			Host: name, Serial: serial, IssueTime: timestamppb.Now(),
			NotAfter: timestamppb.New(cert.NotAfter), JoinTokenId: id,
		})
		if err != nil {
			return nil, err
		}
		if ok {
			if len(st.Certs) > 0 {
				h.s.creds.wrote(ctx) // the host's earlier certificates went to the deny-list
			}
			h.s.log.Info("host joined", "host", name, "serial", serial, "token_id", id, "previous_certs_revoked", len(st.Certs))
			return &minicloudv1.JoinHostResponse{CertPem: pki.EncodeCert(cert.Raw), CaPem: h.s.ca.CertPEM, Serial: serial}, nil
		}
	}
	return nil, tooMuchContention("join host " + name)
}

func (h *hostService) RevokeHost(ctx context.Context, req *minicloudv1.RevokeHostRequest) (*minicloudv1.RevokeHostResponse, error) {
	name := req.GetName()
	if err := validateHostname("host name", name); err != nil {
		return nil, err
	}
	serials, err := store.RevokeHost(ctx, h.s.etcd, name)
	if err != nil {
		return nil, err
	}
	h.s.creds.wrote(ctx)
	h.s.log.Info("host certificates revoked", "host", name, "serials", serials)
	return &minicloudv1.RevokeHostResponse{RevokedSerials: serials}, nil
}

// authorizeHost binds an agent's call to its certificate: a host may act
// only for the host its certificate names (the policy table already
// admitted only host certificates to these calls).
func (s *Server) authorizeHost(ctx context.Context, name string) error {
	p := auth.FromContext(ctx)
	if p == nil || p.Kind != auth.KindHost {
		return errdefs.Unauthenticated("calls for host %s need the host's client certificate: join the host first (`minicloudd agent --join TOKEN --ca-hash HASH`, see docs/operations.md)", name)
	}
	if p.Name != name {
		return errdefs.PermissionDenied("certificate is for host %s: it cannot act for host %s", p.Name, name)
	}
	return nil
}

// checkRevoked refuses a call whose client certificate is on the
// deny-list: the credentials cache's copy while it is current, else etcd's
// (credcache.go), so a revocation takes effect at every replica within
// the watch's latency.
func (s *Server) checkRevoked(ctx context.Context) error {
	cert := pki.PeerCert(ctx)
	if cert == nil {
		return nil
	}
	serial := pki.SerialString(cert)
	revoked, ok := s.creds.isRevoked(serial)
	if !ok {
		var err error
		if revoked, err = store.IsRevoked(ctx, s.etcd, serial); err != nil {
			return err
		}
	}
	if revoked {
		return errdefs.Unauthenticated("certificate %s of %s was revoked: the host must join again with a new token (`minicloud host join-token create`)", serial, cert.Subject.CommonName)
	}
	return nil
}

// revokedStream ends a stream (WatchAssignments) the moment its
// certificate is revoked (authenticate refused it if revoked at the start).
func (s *Server) revokedStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	cert := pki.PeerCert(ctx)
	if cert == nil {
		return handler(srv, ss)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	serial := pki.SerialString(cert)
	go func() {
		for wr := range s.etcd.Watch(ctx, store.RevokedKey(serial)) {
			if len(wr.Events) > 0 {
				cancel(errdefs.Unauthenticated("certificate %s of %s was revoked", serial, cert.Subject.CommonName))
				return
			}
		}
	}()
	err := handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
	if cause := context.Cause(ctx); err != nil && errdefs.IsUnauthenticated(cause) {
		return cause
	}
	return err
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// agentCredentials returns the TLS configuration for calling host's agent
// over mTLS: the agent must present the certificate of that very host.
func (s *Server) agentCredentials(host string) *tls.Config {
	cfg := s.agentTLS.Clone()
	cfg.ServerName = host
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return fmt.Errorf("agent of host %s presented no certificate", host)
		}
		leaf := cs.PeerCertificates[0]
		if !pki.HasOrg(leaf, pki.OrgHosts) || leaf.Subject.CommonName != host {
			return fmt.Errorf("agent at the address of host %s presented the certificate of %q, not of host %s", host, leaf.Subject.CommonName, host)
		}
		return nil
	}
	return cfg
}
