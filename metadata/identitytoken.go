package metadata

import (
	"context"
	"fmt"
	"github.com/valyala/fasthttp"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/identity"
)

// IdentitySource signs workload identity tokens for this host's guests.
// The agent's is the API (HostServiceIdentity): the host holds no signing
// key, so a compromised host cannot mint tokens for other hosts' guests.
type IdentitySource interface {
	IdentityToken(ctx context.Context, vmID, audience string, full bool) (token string, expires time.Time, err error)
}

// HostServiceIdentity asks the API for tokens as host (the call carries
// the host's certificate; the API refuses VMs not assigned to it).
type HostServiceIdentity struct {
	Client minicloudv1.HostServiceClient
	Host   string
}

// IdentityToken calls HostService.IssueIdentityToken.
func (h HostServiceIdentity) IdentityToken(ctx context.Context, vmID, audience string, full bool) (string, time.Time, error) {
	resp, err := h.Client.IssueIdentityToken(ctx, &minicloudv1.IssueIdentityTokenRequest{Host: h.Host, VmId: vmID, Audience: audience, Full: full})
	if err != nil {
		return "", time.Time{}, errdefs.FromGRPC(err)
	}
	return resp.GetToken(), resp.GetExpireTime().AsTime(), nil
}

// Bounds of the token cache. A guest may ask for any audience, so both
// what it holds per VM and how fast a VM can make the host call the API
// are limited.
const (
	maxTokensPerVM    = 16
	maxTokens         = 4096
	identityCallLimit = rate.Limit(1) // API calls per second per VM (cache misses)
	identityCallBurst = 10
	identityTimeout   = 10 * time.Second
)

type tokenKey struct {
	vm, audience string
	full         bool
}

type cachedToken struct {
	token            string
	fetched, expires time.Time
}

// fresh says whether the token still has at least half of its life: a
// guest is always handed a token it can use for a while, and each
// (VM, audience) costs the API about two calls an hour.
func (c cachedToken) fresh(now time.Time) bool {
	return now.Before(c.expires.Add(-c.expires.Sub(c.fetched) / 2))
}

// tokenCache holds tokens per (VM, audience, format) until they are half
// used, bounded per VM and in all.
type tokenCache struct {
	src    IdentitySource
	flight singleflight.Group

	mu     sync.Mutex
	tokens map[tokenKey]cachedToken
	perVM  map[string]int
	calls  map[string]*rate.Limiter
}

func newTokenCache(src IdentitySource) *tokenCache {
	return &tokenCache{src: src, tokens: map[tokenKey]cachedToken{}, perVM: map[string]int{}, calls: map[string]*rate.Limiter{}}
}

// errTooManyTokenCalls means the VM asked for more new tokens than its
// limit allows.
var errTooManyTokenCalls = fmt.Errorf("too many identity token requests")

func (c *tokenCache) get(ctx context.Context, k tokenKey, now time.Time) (string, error) {
	c.mu.Lock()
	if t, ok := c.tokens[k]; ok && t.fresh(now) {
		c.mu.Unlock()
		return t.token, nil
	}
	lim, ok := c.calls[k.vm]
	if !ok {
		if len(c.calls) >= maxTokens {
			// Limiters of VMs holding no token (every call refused,
			// or gone): dropping them forgets a spent burst at worst.
			for vm := range c.calls {
				if c.perVM[vm] == 0 {
					delete(c.calls, vm)
				}
			}
		}
		lim = rate.NewLimiter(identityCallLimit, identityCallBurst)
		c.calls[k.vm] = lim
	}
	allowed := lim.AllowN(now, 1)
	c.mu.Unlock()
	if !allowed {
		return "", errTooManyTokenCalls
	}
	// Concurrent misses of one key make one call; the call is not tied
	// to the first asker's request, so its going away fails no other.
	ch := c.flight.DoChan(k.vm+"\x00"+k.audience+"\x00"+fmt.Sprint(k.full), func() (any, error) {
		cctx, cancel := context.WithTimeout(context.Background(), identityTimeout)
		defer cancel()
		tok, exp, err := c.src.IdentityToken(cctx, k.vm, k.audience, k.full)
		if err != nil {
			return nil, err
		}
		c.put(k, cachedToken{token: tok, fetched: now, expires: exp}, now)
		return tok, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return "", r.Err
		}
		return r.Val.(string), nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (c *tokenCache) put(k tokenKey, t cachedToken, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.tokens[k]; !ok {
		if c.perVM[k.vm] >= maxTokensPerVM {
			c.evict(now, k.vm)
		}
		if len(c.tokens) >= maxTokens {
			c.evict(now, "")
		}
		c.perVM[k.vm]++
	}
	c.tokens[k] = t
}

// evict drops the expired tokens (of vm, or of every VM), or else the one
// that expires first; it runs only when a bound is reached, so the scan is
// paid once per insertion at capacity.
func (c *tokenCache) evict(now time.Time, vm string) {
	var victim *tokenKey
	var first time.Time
	dropped := false
	for k, t := range c.tokens {
		if vm != "" && k.vm != vm {
			continue
		}
		if !now.Before(t.expires) {
			c.drop(k)
			dropped = true
			continue
		}
		if victim == nil || t.expires.Before(first) {
			kk := k
			victim, first = &kk, t.expires
		}
	}
	if !dropped && victim != nil {
		c.drop(*victim)
	}
}

func (c *tokenCache) drop(k tokenKey) {
	delete(c.tokens, k)
	if c.perVM[k.vm]--; c.perVM[k.vm] <= 0 {
		delete(c.perVM, k.vm)
		delete(c.calls, k.vm)
	}
}

// serveIdentity answers GCE's service-accounts/<account>/identity:
// ?audience= is required, format=standard (default) or full, licenses is
// accepted and ignored (minicloud images carry no license codes).
func (s *Server) serveIdentity(req *request) {
	if s.idTokens == nil {
		notFound(req)
		return
	}
	q := req.queryValues()
	aud := q.Get("audience")
	if aud == "" {
		writeText(req, fasthttp.StatusBadRequest, "non-empty audience parameter required")
		return
	}
	if err := identity.ValidateAudience(aud); err != nil {
		writeText(req, fasthttp.StatusBadRequest, err.Error())
		return
	}
	var full bool
	switch f := q.Get("format"); f {
	case "", identity.FormatStandard:
	case identity.FormatFull:
		full = true
	default:
		writeText(req, fasthttp.StatusBadRequest, "format must be standard or full")
		return
	}
	id := req.entry.inst.ID
	tok, err := s.idTokens.get(s.baseCtx, tokenKey{vm: id, audience: aud, full: full}, s.opts.Now())
	switch {
	case err == nil:
		writeBody(req, fasthttp.StatusOK, "application/text", []byte(tok))
	case err == errTooManyTokenCalls:
		writeText(req, fasthttp.StatusTooManyRequests, "Too Many Requests")
	case errdefs.IsNotFound(err) || errdefs.KindOf(err) == errdefs.KindPermissionDenied:
		// The API no longer counts the VM as this host's (deleted,
		// moved): this guest gets no token here.
		s.log.Warn("identity token refused by the API", "instance", id, "err", err)
		notFound(req)
	default:
		s.log.Warn("identity token unavailable", "instance", id, "err", err)
		writeText(req, fasthttp.StatusServiceUnavailable, "identity token unavailable, try again")
	}
}
