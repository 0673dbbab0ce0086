package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	josejwt "github.com/go-jose/go-jose/v4/jwt"
	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/identity"
	"github.com/minicloud/minicloud/pkg/store"
)

// clock is a settable time for the identity key schedule.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}
func (c *clock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// identityAPI is an API replica on e's etcd with its own clock, serving
// gRPC (plaintext: the host name is taken as given, as on the all-in-one)
// and its HTTP listener, whose URL is the issuer.
type identityAPI struct {
	srv   *apiserver.Server
	hosts minicloudv1.HostServiceClient
	ids   minicloudv1.IdentityServiceClient
	url   string
}

func (e *env) identityAPI(clk *clock) *identityAPI {
	e.t.Helper()
	hs := httptest.NewUnstartedServer(nil)
	url := "http://" + hs.Listener.Addr().String()
	cfg := apiserver.Config{Client: e.etcd, Logger: slog.New(slog.DiscardHandler), IdentityIssuer: url + "/", IdentityKeyRotation: identity.MinRotation,
		CA: e.ca, TLS: e.serverTLS(), AgentTLS: e.controlPlaneTLS()}
	if clk != nil {
		cfg.Now = clk.now
	}
	srv, err := apiserver.New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	hs.Config.Handler = srv.MetricsHandler()
	hs.Start()
	e.t.Cleanup(hs.Close)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	go srv.Serve(lis)
	e.t.Cleanup(srv.GRPCServer().Stop)
	// Host h1's agent asks for tokens; the admin reads the keys.
	h1 := e.hostConnTo(lis.Addr().String(), "h1")
	admin := e.userConnTo(lis.Addr().String(), e.admin)
	return &identityAPI{srv: srv, hosts: minicloudv1.NewHostServiceClient(h1), ids: minicloudv1.NewIdentityServiceClient(admin), url: url}
}

// fetchJWKS gets the key set as a third party does: plain HTTP, no
// credential.
func fetchJWKS(t *testing.T, url string) jose.JSONWebKeySet {
	t.Helper()
	resp, err := http.Get(url + identity.JWKSPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET jwks: %d %s %q", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(b, &set); err != nil {
		t.Fatalf("JWKS %q: %v", b, err)
	}
	return set
}

type tokenClaims struct {
	josejwt.Claims
	Minicloud *identity.MinicloudClaim `json:"minicloud"`
}

// verify checks tok with go-jose (not the library that signed it) against
// set, as a third party would: signature by a published key, issuer,
// audience and expiry at now.
func verify(tok string, set jose.JSONWebKeySet, issuer, audience string, now time.Time) (*tokenClaims, error) {
	parsed, err := josejwt.ParseSigned(tok, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		return nil, err
	}
	var c tokenClaims
	if err := parsed.Claims(set, &c); err != nil {
		return nil, err
	}
	if err := c.ValidateWithLeeway(josejwt.Expected{Issuer: issuer, AnyAudience: josejwt.Audience{audience}, Time: now}, 0); err != nil {
		return nil, err
	}
	return &c, nil
}

func TestIdentityTokenVerifiesWithPublishedKeys(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	vm := e.createVM("web1", func(r *minicloudv1.CreateVMRequest) { r.Spec.AvailabilityZone = "az1" })
	e.place(vm.Meta.Id, "h1")
	api := e.identityAPI(nil)
	c := ctx(t)

	resp, err := api.hosts.IssueIdentityToken(c, &minicloudv1.IssueIdentityTokenRequest{Host: "h1", VmId: vm.Meta.Id, Audience: "https://vault.example", Full: true})
	if err != nil {
		t.Fatal(err)
	}
	set := fetchJWKS(t, api.url)
	if len(set.Keys) != 1 || set.Keys[0].Algorithm != "RS256" || set.Keys[0].Use != "sig" || !set.Keys[0].IsPublic() {
		t.Fatalf("JWKS = %+v, want one public RS256 signing key", set.Keys)
	}
	claims, err := verify(resp.Token, set, api.url, "https://vault.example", time.Now())
	if err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	want := identity.ComputeEngine{InstanceID: vm.Meta.Id, InstanceName: "web1", ProjectID: "default", Zone: "az1", Host: "h1", InstanceCreationTimestamp: vm.Meta.CreateTime.Seconds}
	if claims.Subject != vm.Meta.Id || claims.Minicloud == nil || claims.Minicloud.ComputeEngine != want {
		t.Fatalf("claims = %+v %+v, want sub %s and %+v", claims.Claims, claims.Minicloud, vm.Meta.Id, want)
	}
	if life := claims.Expiry.Time().Sub(claims.IssuedAt.Time()); life != identity.TokenLifetime {
		t.Errorf("token lives %s, want %s", life, identity.TokenLifetime)
	}
	if !resp.ExpireTime.AsTime().Equal(claims.Expiry.Time()) {
		t.Errorf("expire_time %s, exp claim %s", resp.ExpireTime.AsTime(), claims.Expiry.Time())
	}

	// Standard tokens say who and for whom, nothing more.
	std, err := api.hosts.IssueIdentityToken(c, &minicloudv1.IssueIdentityTokenRequest{Host: "h1", VmId: vm.Meta.Id, Audience: "aud2"})
	if err != nil {
		t.Fatal(err)
	}
	if claims, err := verify(std.Token, set, api.url, "aud2", time.Now()); err != nil || claims.Minicloud != nil {
		t.Fatalf("standard token: %+v %v", claims, err)
	}

	// Wrong audience, expired, or a forged signature: refused.
	if _, err := verify(resp.Token, set, api.url, "https://other.example", time.Now()); !errors.Is(err, josejwt.ErrInvalidAudience) {
		t.Errorf("wrong audience: %v, want ErrInvalidAudience", err)
	}
	if _, err := verify(resp.Token, set, api.url, "https://vault.example", time.Now().Add(identity.TokenLifetime+time.Second)); !errors.Is(err, josejwt.ErrExpired) {
		t.Errorf("after its lifetime: %v, want ErrExpired", err)
	}
	parts := strings.Split(resp.Token, ".")
	tampered := parts[0] + "." + strings.TrimRight(parts[1], "=") + "x." + parts[2]
	if _, err := verify(tampered, set, api.url, "https://vault.example", time.Now()); err == nil {
		t.Error("a token with a changed payload verified")
	}

	// The same keys over gRPC, and discovery pointing at them.
	g, err := api.ids.GetJWKS(c, &minicloudv1.GetJWKSRequest{})
	if err != nil || g.Issuer != api.url {
		t.Fatalf("GetJWKS: %v %v", g, err)
	}
	var viaGRPC jose.JSONWebKeySet
	if err := json.Unmarshal(g.Jwks, &viaGRPC); err != nil || len(viaGRPC.Keys) != 1 || viaGRPC.Keys[0].KeyID != set.Keys[0].KeyID {
		t.Fatalf("GetJWKS keys %s: %v", g.Jwks, err)
	}
	dresp, err := http.Get(api.url + identity.DiscoveryPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dresp.Body.Close()
	var disc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.NewDecoder(dresp.Body).Decode(&disc); err != nil || disc.Issuer != api.url || disc.JWKSURI != api.url+identity.JWKSPath {
		t.Fatalf("discovery: %+v %v", disc, err)
	}
}

func TestIdentityTokenOnlyForTheHostsOwnVMs(t *testing.T) {
	e := newTLSEnv(t)
	e.seed()
	h1, h2 := e.hostClient(e.mustJoin("h1")), e.hostClient(e.mustJoin("h2"))
	c := ctx(t)
	for name, cl := range map[string]minicloudv1.HostServiceClient{"h1": h1, "h2": h2} {
		if _, err := cl.RegisterHost(c, hostReq(name, "127.0.0.1:1")); err != nil {
			t.Fatal(err)
		}
	}
	vm := e.createVM("web1")
	req := func(host, vmID, aud string) *minicloudv1.IssueIdentityTokenRequest {
		return &minicloudv1.IssueIdentityTokenRequest{Host: host, VmId: vmID, Audience: aud, Full: true}
	}
	_, err := h1.IssueIdentityToken(c, req("h1", vm.Meta.Id, "a"))
	wantCode(t, err, codes.PermissionDenied, "not assigned to host h1")
	e.place(vm.Meta.Id, "h1")
	if _, err := h1.IssueIdentityToken(c, req("h1", vm.Meta.Id, "a")); err != nil {
		t.Fatalf("h1 for its own VM: %v", err)
	}
	// h2 cannot get a token for h1's VM, neither in its own name nor in
	// h1's; an operator without a host certificate cannot either.
	_, err = h2.IssueIdentityToken(c, req("h2", vm.Meta.Id, "a"))
	wantCode(t, err, codes.PermissionDenied, "not assigned to host h2")
	_, err = h2.IssueIdentityToken(c, req("h1", vm.Meta.Id, "a"))
	wantCode(t, err, codes.PermissionDenied, "it cannot act for host h1")
	_, err = e.hosts.IssueIdentityToken(c, req("h1", vm.Meta.Id, "a"))
	wantCode(t, err, codes.PermissionDenied, "is for host agents")
	_, err = minicloudv1.NewHostServiceClient(e.userConn("")).IssueIdentityToken(c, req("h1", vm.Meta.Id, "a"))
	wantCode(t, err, codes.Unauthenticated, "client certificate")

	_, err = h1.IssueIdentityToken(c, req("h1", "no-such-vm", "a"))
	wantCode(t, err, codes.NotFound, "does not exist")
	_, err = h1.IssueIdentityToken(c, req("h1", strings.Repeat("x", 65), "a"))
	wantCode(t, err, codes.InvalidArgument, "vm_id")
	for _, aud := range []string{"", strings.Repeat("a", identity.MaxAudienceLength+1), "two words", "caf\u00e9", "nl\n"} {
		_, err = h1.IssueIdentityToken(c, req("h1", vm.Meta.Id, aud))
		wantCode(t, err, codes.InvalidArgument, "audience")
	}
}

func TestIdentityKeyRotationKeepsOldTokensVerifiable(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")
	clk := newClock()
	api := e.identityAPI(clk)
	c := ctx(t)
	issue := func() string {
		t.Helper()
		r, err := api.hosts.IssueIdentityToken(c, &minicloudv1.IssueIdentityTokenRequest{Host: "h1", VmId: vm.Meta.Id, Audience: "aud"})
		if err != nil {
			t.Fatal(err)
		}
		return r.Token
	}
	kid := func(tok string) string {
		t.Helper()
		p, err := josejwt.ParseSigned(tok, []jose.SignatureAlgorithm{jose.RS256})
		if err != nil {
			t.Fatal(err)
		}
		return p.Headers[0].KeyID
	}
	kids := func(set jose.JSONWebKeySet) []string {
		var out []string
		for _, k := range set.Keys {
			out = append(out, k.KeyID)
		}
		return out
	}
	start := clk.now()
	rot := identity.MinRotation

	t1 := issue()
	k1 := kid(t1)
	if got := kids(fetchJWKS(t, api.url)); len(got) != 1 || got[0] != k1 {
		t.Fatalf("JWKS %v, want [%s]", got, k1)
	}
	// Within Prepublish of the switch, the next key is made and published
	// but does not sign yet.
	clk.advance(rot - identity.Prepublish/2)
	t2 := issue()
	set := fetchJWKS(t, api.url)
	if kid(t2) != k1 || len(set.Keys) != 2 {
		t.Fatalf("before the switch: token by %s, JWKS %v; want by %s and two keys", kid(t2), kids(set), k1)
	}
	k2 := kids(set)[1]
	// After the switch the new key signs; the old stays published while
	// its last tokens live.
	clk.advance(identity.Prepublish/2 + identity.ClockSkew + time.Minute)
	t3 := issue()
	set = fetchJWKS(t, api.url)
	if kid(t3) != k2 {
		t.Fatalf("after the switch: token by %s, want %s", kid(t3), k2)
	}
	if _, err := verify(t2, set, api.url, "aud", clk.now()); err != nil {
		t.Fatalf("a token of the old key, still unexpired after the rotation, does not verify: %v", err)
	}
	if _, err := verify(t3, set, api.url, "aud", clk.now()); err != nil {
		t.Fatal(err)
	}
	// Once every token of the old key expired, it leaves the set.
	clk.ns.Store(start.Add(rot + identity.TokenLifetime + identity.ClockSkew + time.Second).UnixNano())
	if got := kids(fetchJWKS(t, api.url)); len(got) != 1 || got[0] != k2 {
		t.Fatalf("JWKS %v, want only %s", got, k2)
	}
	if _, err := verify(t1, fetchJWKS(t, api.url), api.url, "aud", start); err == nil {
		t.Fatal("a token of a retired key verified")
	}
}

// Replicas that start together agree on one key (compare-and-create).
func TestIdentityKeyCreatedOnceByConcurrentReplicas(t *testing.T) {
	e := newEnv(t)
	apis := []*identityAPI{e.identityAPI(nil), e.identityAPI(nil), e.identityAPI(nil)}
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(apis))
	for range 2 {
		for _, a := range apis {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- a.srv.EnsureIdentityKeys(context.Background())
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	stored, _, err := store.ListIdentityKeys(ctx(t), e.etcd)
	if err != nil || len(stored) != 1 {
		t.Fatalf("%d keys stored (%v), want 1", len(stored), err)
	}
	for _, a := range apis {
		if got := fetchJWKS(t, a.url); len(got.Keys) != 1 || got.Keys[0].KeyID != stored[0].Value.Kid {
			t.Fatalf("replica %s publishes %+v, want key %s", a.url, got.Keys, stored[0].Value.Kid)
		}
	}
}
