package server

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/identity"
	"github.com/minicloud/minicloud/pkg/store"
)

// Workload identity (docs/security.md): the API holds the signing keys in
// etcd, as it holds the cluster CA, and signs a token only for a VM
// assigned to the host that asks; a compromised host can thus speak only
// for its own guests, and only while they are on it.

// DefaultIdentityIssuer is the "iss" of tokens when none is configured: a
// name, not a URL, so OpenID discovery is not possible until the operator
// gives the URL third parties reach the API's HTTP listener at.
const DefaultIdentityIssuer = "minicloud"

// identityRotateEvery is how often a replica checks the key schedule on
// its own, so the next key is published ahead even when no token is asked
// for (a Prepublish of an hour leaves plenty of checks).
const identityRotateEvery = 10 * time.Minute

// maxVMIDLen bounds vm_id before it reaches etcd (a UUID is 36).
const maxVMIDLen = 64

// identityKeys holds parsed keys by id: parsing an RSA key is what a
// token costs beyond the etcd reads, and keys never change under an id.
// create serialises key creation within a replica: generating an RSA key
// takes a while, and concurrent callers at the moment a key is due need
// one, not one each.
type identityKeys struct {
	mu     sync.Mutex
	parsed map[string]identity.Key
	create sync.Mutex
}

// loadIdentityKeys reads the keys and runs the schedule. With create, it
// makes the next key when it is due (identity.Schedule says when) and the
// plan it returns has Signing set; without, it only reads (the public JWKS
// must not make anyone generate keys at will).
func (s *Server) loadIdentityKeys(ctx context.Context, now time.Time, create bool) ([]identity.Key, identity.Plan, error) {
	locked := false
	defer func() {
		if locked {
			s.idKeys.create.Unlock()
		}
	}()
	for range maxTxnAttempts {
		stored, rev, err := store.ListIdentityKeys(ctx, s.etcd)
		if err != nil {
			return nil, identity.Plan{}, err
		}
		keys := make([]identity.Key, 0, len(stored))
		seen := make(map[string]bool, len(stored))
		s.idKeys.mu.Lock()
		for _, o := range stored {
			v := o.Value
			k, ok := s.idKeys.parsed[v.GetKid()]
			if !ok {
				if k, err = identity.ParsePrivate(v.GetKid(), v.GetKeyPem(), v.GetNotBefore().AsTime(), v.GetSignUntil().AsTime()); err != nil {
					s.idKeys.mu.Unlock()
					return nil, identity.Plan{}, errdefs.Internal("identity key in etcd: %v", err)
				}
				s.idKeys.parsed[k.ID] = k
			}
			seen[k.ID] = true
			keys = append(keys, k)
		}
		for id := range s.idKeys.parsed {
			if !seen[id] {
				delete(s.idKeys.parsed, id) // its lease ended
			}
		}
		s.idKeys.mu.Unlock()
		plan := identity.Schedule(keys, now)
		if plan.NewKeyAt.IsZero() || !create {
			return keys, plan, nil
		}
		if !locked {
			// Wait for a creation in progress here, then read again.
			s.idKeys.create.Lock()
			locked = true
			continue
		}
		k, err := identity.NewKey(plan.NewKeyAt, s.idRotation)
		if err != nil {
			return nil, identity.Plan{}, errdefs.Internal("%v", err)
		}
		pemBytes, err := k.EncodePrivate()
		if err != nil {
			return nil, identity.Plan{}, errdefs.Internal("%v", err)
		}
		ok, err := store.CreateIdentityKey(ctx, s.etcd, &minicloudv1.IdentityKey{
			Kid: k.ID, KeyPem: pemBytes, CreateTime: timestamppb.New(now),
			NotBefore: timestamppb.New(k.NotBefore), SignUntil: timestamppb.New(k.SignUntil),
		}, rev, k.PublishUntil())
		if err != nil {
			return nil, identity.Plan{}, err
		}
		if ok {
			s.log.Info("identity signing key created", "kid", k.ID, "not_before", k.NotBefore, "sign_until", k.SignUntil)
		}
		// Read again either way: if another replica won, its key is the
		// one to use.
	}
	return nil, identity.Plan{}, tooMuchContention("create identity key")
}

// EnsureIdentityKeys makes sure a signing key exists (and the next one
// once it is due); runAPI calls it at start so the JWKS is never empty.
func (s *Server) EnsureIdentityKeys(ctx context.Context) error {
	_, _, err := s.loadIdentityKeys(ctx, s.now(), true)
	return err
}

// RotateIdentityKeys runs the key schedule every few minutes until ctx
// ends, so that the next key is published before it signs whether or not
// tokens are being asked for. Every replica may run it: creation is
// compare-and-create.
func (s *Server) RotateIdentityKeys(ctx context.Context) {
	t := time.NewTicker(identityRotateEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.EnsureIdentityKeys(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("identity key rotation", "err", err)
			}
		}
	}
}

func (h *hostService) IssueIdentityToken(ctx context.Context, req *minicloudv1.IssueIdentityTokenRequest) (*minicloudv1.IssueIdentityTokenResponse, error) {
	host, id := req.GetHost(), req.GetVmId()
	if err := h.s.authorizeHost(ctx, host); err != nil {
		return nil, err
	}
	if err := validateHostname("host name", host); err != nil {
		return nil, err
	}
	if id == "" || len(id) > maxVMIDLen {
		return nil, errdefs.Invalid("vm_id must be a VM id of 1 to %d characters", maxVMIDLen)
	}
	if err := identity.ValidateAudience(req.GetAudience()); err != nil {
		return nil, errdefs.Invalid("%v", err)
	}
	vm, err := store.GetVM(ctx, h.s.etcd, id)
	if errdefs.IsNotFound(err) {
		return nil, errdefs.NotFound("vm %s does not exist (any more)", id)
	}
	if err != nil {
		return nil, err
	}
	// The one check that keeps a host to its own guests: the claims
	// below come from etcd, so the host chooses only which of its VMs.
	if cur := vm.GetStatus().GetHost(); cur != host {
		return nil, errdefs.PermissionDenied("vm %s is not assigned to host %s: a host gets identity tokens only for its own VMs", id, host)
	}
	now := h.s.now()
	_, plan, err := h.s.loadIdentityKeys(ctx, now, true)
	if err != nil {
		return nil, err
	}
	exp := now.Add(identity.TokenLifetime)
	claims := identity.Claims{
		Issuer: h.s.idIssuer, Subject: id, Audience: req.GetAudience(),
		IssuedAt: now.Unix(), ExpiresAt: exp.Unix(),
	}
	if req.GetFull() {
		claims.Minicloud = &identity.MinicloudClaim{ComputeEngine: instanceClaims(vm, host)}
	}
	tok, err := identity.Sign(*plan.Signing, claims)
	if err != nil {
		return nil, errdefs.Internal("%v", err)
	}
	return &minicloudv1.IssueIdentityTokenResponse{Token: tok, ExpireTime: timestamppb.New(time.Unix(exp.Unix(), 0))}, nil
}

// instanceClaims describes vm as the metadata service describes it to
// the guest (same project and zone defaults as metadata.InstanceFromVM).
func instanceClaims(vm *minicloudv1.VM, host string) identity.ComputeEngine {
	meta := vm.GetMeta()
	ce := identity.ComputeEngine{
		InstanceID: meta.GetId(), InstanceName: meta.GetName(),
		ProjectID: meta.GetProject(), Zone: vm.GetSpec().GetAvailabilityZone(), Host: host,
	}
	if ce.ProjectID == "" {
		ce.ProjectID = "default"
	}
	if ce.Zone == "" {
		ce.Zone = "default"
	}
	if ct := meta.GetCreateTime(); ct != nil {
		ce.InstanceCreationTimestamp = ct.GetSeconds()
	}
	return ce
}

// identityService publishes the verification keys over gRPC (the CLI's
// `minicloud identity jwks`).
type identityService struct {
	minicloudv1.UnimplementedIdentityServiceServer
	s *Server
}

func (i *identityService) GetJWKS(ctx context.Context, _ *minicloudv1.GetJWKSRequest) (*minicloudv1.GetJWKSResponse, error) {
	// An authenticated caller may make the first key appear (an API
	// that never ran EnsureIdentityKeys); the public HTTP path only reads.
	jwks, err := i.s.jwks(ctx, true)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.GetJWKSResponse{Jwks: jwks, Issuer: i.s.idIssuer}, nil
}

// jwks renders the published keys now.
func (s *Server) jwks(ctx context.Context, create bool) ([]byte, error) {
	now := s.now()
	keys, _, err := s.loadIdentityKeys(ctx, now, create)
	if err != nil {
		return nil, err
	}
	b, err := identity.JWKS(identity.Published(keys, now))
	if err != nil {
		return nil, errdefs.Internal("%v", err)
	}
	return b, nil
}

// serveJWKS and serveDiscovery answer anyone, without a token: the keys
// are public, and a third party verifying a guest's token has no
// minicloud credential.
func (s *Server) serveJWKS(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	b, err := s.jwks(ctx, false)
	if err != nil {
		s.log.Warn("serve JWKS", "err", err)
		http.Error(w, "keys unavailable", http.StatusServiceUnavailable)
		return
	}
	writeJSONDoc(w, r, b)
}

func (s *Server) serveDiscovery(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if !strings.HasPrefix(s.idIssuer, "https://") && !strings.HasPrefix(s.idIssuer, "http://") {
		http.Error(w, "no issuer URL is configured: start the API with --identity-issuer URL", http.StatusNotFound)
		return
	}
	b, err := identity.Discovery(s.idIssuer)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	writeJSONDoc(w, r, b)
}

func writeJSONDoc(w http.ResponseWriter, r *http.Request, b []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	h.Set("Cache-Control", "public, max-age="+strconv.Itoa(int(identity.CacheMaxAge/time.Second)))
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(b)
}
