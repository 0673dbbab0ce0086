package metadata

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	josejwt "github.com/go-jose/go-jose/v4/jwt"
	"google.golang.org/grpc"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/identity"
	"github.com/minicloud/minicloud/pkg/store"
)

// countingSource counts the calls that reach the API.
type countingSource struct {
	IdentitySource
	calls atomic.Int64
}

func (c *countingSource) IdentityToken(ctx context.Context, vmID, aud string, full bool) (string, time.Time, error) {
	c.calls.Add(1)
	return c.IdentitySource.IdentityToken(ctx, vmID, aud, full)
}

// realAPI starts etcd and an API server (gRPC and its HTTP listener, whose
// URL is the issuer), with VM A assigned to host h1 and VM B to h2.
func realAPI(t *testing.T) (hosts minicloudv1.HostServiceClient, issuer string) {
	t.Helper()
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	for _, vm := range []struct{ id, name, host string }{{idA, "web1", "h1"}, {idB, "web2", "h2"}} {
		spec, _ := store.Marshal(&minicloudv1.VM{Meta: &minicloudv1.ObjectMeta{Id: vm.id, Name: vm.name, Project: "proj1"}, Spec: &minicloudv1.VMSpec{AvailabilityZone: "zone-a"}})
		status, _ := store.Marshal(&minicloudv1.VMStatus{Host: vm.host})
		if _, err := cli.Put(ctx, store.VMSpecKey(vm.id), spec); err != nil {
			t.Fatal(err)
		}
		if _, err := cli.Put(ctx, store.VMStatusKey(vm.id), status); err != nil {
			t.Fatal(err)
		}
	}
	hs := httptest.NewUnstartedServer(nil)
	issuer = "http://" + hs.Listener.Addr().String()
	api, err := apiservertest.Listen(ctx, cli, apiserver.Config{IdentityIssuer: issuer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(api.Server.GRPCServer().Stop)
	hs.Config.Handler = api.Server.MetricsHandler()
	hs.Start()
	t.Cleanup(hs.Close)
	// The metadata service asks as host h1's agent does.
	opts, err := api.HostDialOptions("h1")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(api.Addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return minicloudv1.NewHostServiceClient(conn), issuer
}

func identityPath(aud, format string) string {
	q := url.Values{"audience": {aud}}
	if format != "" {
		q.Set("format", format)
	}
	return "/computeMetadata/v1/instance/service-accounts/default/identity?" + q.Encode()
}

// A guest's token, fetched through the metadata service as the guest does,
// is signed by the API and verifies with go-jose against the JWKS a third
// party fetches over HTTP; it names the guest that asked and no other.
func TestIdentityTokenThroughMetadataVerifies(t *testing.T) {
	hosts, issuer := realAPI(t)
	src := &countingSource{IdentitySource: HostServiceIdentity{Client: hosts, Host: "h1"}}
	e := newTestEnv(t, func(o *Options) { o.Identity = src })
	gce := map[string]string{"Metadata-Flavor": "Google"}

	r := e.do(2, "GET", identityPath("https://vault.example", "full"), gce)
	if r.code != http.StatusOK || r.header.Get("Metadata-Flavor") != "Google" {
		t.Fatalf("identity for A: %d %q", r.code, r.body)
	}
	resp, err := http.Get(issuer + identity.JWKSPath)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(b, &set); err != nil {
		t.Fatalf("JWKS %q: %v", b, err)
	}
	tok, err := josejwt.ParseSigned(r.body, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		t.Fatal(err)
	}
	var claims struct {
		josejwt.Claims
		Minicloud identity.MinicloudClaim `json:"minicloud"`
	}
	if err := tok.Claims(set, &claims); err != nil {
		t.Fatalf("signature: %v", err)
	}
	if err := claims.ValidateWithLeeway(josejwt.Expected{Issuer: issuer, AnyAudience: josejwt.Audience{"https://vault.example"}, Time: time.Now()}, 0); err != nil {
		t.Fatalf("claims: %v", err)
	}
	ce := claims.Minicloud.ComputeEngine
	if claims.Subject != idA || ce.InstanceID != idA || ce.InstanceName != "web1" || ce.ProjectID != "proj1" || ce.Zone != "zone-a" || ce.Host != "h1" {
		t.Fatalf("claims %+v %+v, want instance A on h1", claims.Claims, ce)
	}
	if err := claims.ValidateWithLeeway(josejwt.Expected{AnyAudience: josejwt.Audience{"https://other.example"}, Time: time.Now()}, 0); err == nil {
		t.Error("token verified for another audience")
	}
	if err := claims.ValidateWithLeeway(josejwt.Expected{Time: time.Now().Add(identity.TokenLifetime + time.Minute)}, 0); err == nil {
		t.Error("token verified after its lifetime")
	}

	// Asked again: the cached token, no second API call.
	if again := e.do(2, "GET", identityPath("https://vault.example", "full"), gce); again.body != r.body || src.calls.Load() != 1 {
		t.Errorf("second fetch: same token %v, %d API calls", again.body == r.body, src.calls.Load())
	}
	// A standard token is another token, without the instance details.
	std := e.do(2, "GET", identityPath("https://vault.example", ""), gce)
	if std.code != http.StatusOK || std.body == r.body {
		t.Fatalf("standard: %d %q", std.code, std.body)
	}
	// B is a guest of this host's metadata service, but the API has it on
	// h2: this host cannot get it a token (nor can B ask for A's: the
	// guest is who its packets say, and the claims come from etcd).
	// A source that is no guest gets nothing either.
	for _, from := range []int{3, 9} {
		if r := e.do(from, "GET", identityPath("https://vault.example", "full"), gce); r.code != http.StatusNotFound {
			t.Errorf("from 127.0.0.%d: %d %q, want 404", from, r.code, r.body)
		}
	}

	// GCE's rules: the header, a valid audience and format.
	if r := e.do(2, "GET", identityPath("x", ""), nil); r.code != http.StatusForbidden {
		t.Errorf("without Metadata-Flavor: %d", r.code)
	}
	for path, code := range map[string]int{
		"/computeMetadata/v1/instance/service-accounts/default/identity": http.StatusBadRequest,
		identityPath("two words", ""):                                    http.StatusBadRequest,
		identityPath("x", "compact"):                                     http.StatusBadRequest,
		"/computeMetadata/v1/instance/service-accounts/default@proj1.minicloud.internal/identity?audience=x": http.StatusOK,
		"/computeMetadata/v1/instance/service-accounts/default/token":                                        http.StatusNotFound,
	} {
		if r := e.do(2, "GET", path, gce); r.code != code {
			t.Errorf("GET %s: %d %q, want %d", path, r.code, r.body, code)
		}
	}
}

func TestServiceAccountsListing(t *testing.T) {
	e := newTestEnv(t, nil)
	gce := map[string]string{"Metadata-Flavor": "Google"}
	for path, want := range map[string]string{
		"/computeMetadata/v1/instance/service-accounts/":                "default/\ndefault@proj1.minicloud.internal/\n",
		"/computeMetadata/v1/instance/service-accounts/default/":        "aliases\nemail\nidentity\n",
		"/computeMetadata/v1/instance/service-accounts/default/email":   "default@proj1.minicloud.internal",
		"/computeMetadata/v1/instance/service-accounts/?recursive=true": `{"default":{"aliases":"default","email":"default@proj1.minicloud.internal"},"default@proj1.minicloud.internal":{"aliases":"default","email":"default@proj1.minicloud.internal"}}`,
	} {
		if r := e.do(2, "GET", path, gce); r.code != http.StatusOK || r.body != want {
			t.Errorf("GET %s = %d %q, want %q", path, r.code, r.body, want)
		}
	}
	// Without an identity source (no API), the path exists but serves no
	// token.
	e.expect(2, "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x", http.StatusForbidden, "")
	if r := e.do(2, "GET", identityPath("x", ""), gce); r.code != http.StatusNotFound {
		t.Errorf("identity without a source: %d", r.code)
	}
}

// fakeSource signs nothing: it hands out numbered tokens valid for an hour.
type fakeSource struct{ n atomic.Int64 }

func (f *fakeSource) IdentityToken(_ context.Context, vm, aud string, _ bool) (string, time.Time, error) {
	return fmt.Sprintf("%s/%s/%d", vm, aud, f.n.Add(1)), time.Now().Add(time.Hour), nil
}

func TestTokenCacheIsBounded(t *testing.T) {
	src := &fakeSource{}
	c := newTokenCache(src)
	now := time.Now()
	ctx := context.Background()
	// The per-VM call limit: a burst, then refusals until time passes.
	for i := range identityCallBurst {
		if _, err := c.get(ctx, tokenKey{vm: idA, audience: fmt.Sprint(i)}, now); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.get(ctx, tokenKey{vm: idA, audience: "one-more"}, now); err != errTooManyTokenCalls {
		t.Fatalf("past the burst: %v", err)
	}
	// Cached tokens are served without a call, even past the limit.
	if tok, err := c.get(ctx, tokenKey{vm: idA, audience: "0"}, now); err != nil || tok != idA+"/0/1" {
		t.Fatalf("cached: %q %v", tok, err)
	}
	// Many audiences over time: at most maxTokensPerVM held for the VM.
	for i := range 3 * maxTokensPerVM {
		now = now.Add(2 * time.Second)
		if _, err := c.get(ctx, tokenKey{vm: idA, audience: fmt.Sprint("many-", i)}, now); err != nil {
			t.Fatal(err)
		}
	}
	if n := c.perVM[idA]; n != maxTokensPerVM || len(c.tokens) != maxTokensPerVM {
		t.Fatalf("holding %d (%d in all), want %d", n, len(c.tokens), maxTokensPerVM)
	}
	// Past half its life a token is fetched again.
	k := tokenKey{vm: idA, audience: fmt.Sprint("many-", 3*maxTokensPerVM-1)}
	first, _ := c.get(ctx, k, now)
	later, _ := c.get(ctx, k, now.Add(31*time.Minute))
	if first == later {
		t.Errorf("token past half its life served again: %q", later)
	}
}
