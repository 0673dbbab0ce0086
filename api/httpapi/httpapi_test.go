package httpapi_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/minicloud/minicloud/api/httpapi"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

// web is a real API server (embedded etcd, TLS, the bootstrap admin) with
// the HTTP listener in front of it, as minicloudd api --web-listen runs it.
type web struct {
	api    *apiservertest.Running
	url    string // https://127.0.0.1:PORT
	client *http.Client
}

// startWeb starts both; cfg.API is filled in.
func startWeb(t testing.TB, cfg httpapi.Config) *web {
	t.Helper()
	_, cli := etcdtest.Start(t)
	api, err := apiservertest.Listen(context.Background(), cli, apiserver.Config{ImageDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { api.Server.GRPCServer().Stop() })
	conn, err := httpapi.DialAPI(api.Addr, api.CA.Pool())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	cfg.API = conn
	h, err := httpapi.NewHandler(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httpapi.NewServer(h, api.TLS)
	go func() {
		if err := srv.ServeTLS(lis, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	}()
	t.Cleanup(func() { srv.Close() })
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: api.CA.Pool()}}}
	t.Cleanup(client.CloseIdleConnections)
	return &web{api: api, url: "https://" + lis.Addr().String(), client: client}
}

// reply is one HTTP response: its status and its JSON body.
type reply struct {
	code int
	body map[string]any
	raw  string
}

// send sends method path with body (nil: none), token ("" for none) and
// the header pairs in kv; the caller closes the response.
func (w *web) send(ctx context.Context, t testing.TB, token, method, path string, body io.Reader, kv ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, w.url+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		req.Header.Set(kv[i], kv[i+1])
	}
	resp, err := w.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp
}

// do sends method path with body (JSON, or "") and token ("" for none).
func (w *web) do(t testing.TB, token, method, path, body string) reply {
	t.Helper()
	var in io.Reader
	if body != "" {
		in = strings.NewReader(body)
	}
	resp := w.send(context.Background(), t, token, method, path, in, "Content-Type", "application/json")
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	r := reply{code: resp.StatusCode, raw: string(raw)}
	if err := json.Unmarshal(raw, &r.body); err != nil {
		t.Fatalf("%s %s: %d, body is not a JSON object: %v: %q", method, path, resp.StatusCode, err, raw)
	}
	return r
}

// want fails the test unless r has status code and its message (an
// error's) contains msg.
func (r reply) want(t testing.TB, code int, msg string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("status %d, want %d: %s", r.code, code, r.raw)
	}
	if got, _ := r.body["message"].(string); !strings.Contains(got, msg) {
		t.Fatalf("message %q, want it to contain %q", got, msg)
	}
}

func TestAuthenticationIsTheAPIs(t *testing.T) {
	w := startWeb(t, httpapi.Config{})
	w.do(t, "", "GET", "/v1/vms", "").want(t, http.StatusUnauthorized, "token")
	w.do(t, "mct_notatoken", "GET", "/v1/vms", "").want(t, http.StatusUnauthorized, "")

	admin := w.api.AdminToken
	w.do(t, admin, "POST", "/v1/projects", `{"name":"team"}`).want(t, http.StatusOK, "")
	bob := w.do(t, admin, "POST", "/v1/users", `{"name":"bob","project":"team","role":"member"}`)
	bob.want(t, http.StatusOK, "")
	token, _ := bob.body["token"].(string)
	if !strings.HasPrefix(token, "mct_") {
		t.Fatalf("CreateUser gave token %q", token)
	}
	// A member may not create flavors (admin only): PERMISSION_DENIED.
	w.do(t, token, "POST", "/v1/flavors", `{"name":"small","vcpus":1,"memoryMib":512,"diskGib":1}`).
		want(t, http.StatusForbidden, "admin")
	// A project bob has no role in does not exist for him.
	w.do(t, token, "GET", "/v1/vms?project=default", "").want(t, http.StatusNotFound, "project default not found")
	// His own project's VMs he may list.
	if r := w.do(t, token, "GET", "/v1/vms?project=team", ""); r.code != http.StatusOK {
		t.Fatalf("bob lists team's VMs: %d %s", r.code, r.raw)
	}
	who := w.do(t, token, "GET", "/v1/whoami", "")
	if who.code != http.StatusOK || who.body["name"] != "bob" {
		t.Fatalf("whoami: %d %s", who.code, who.raw)
	}
}

func TestFlavorOverHTTP(t *testing.T) {
	w := startWeb(t, httpapi.Config{})
	admin := w.api.AdminToken
	created := w.do(t, admin, "POST", "/v1/flavors", `{"name":"small","vcpus":2,"memoryMib":1024,"diskGib":5}`)
	created.want(t, http.StatusOK, "")
	got := w.do(t, admin, "GET", "/v1/flavors/small", "")
	got.want(t, http.StatusOK, "")
	if meta, _ := got.body["meta"].(map[string]any); meta["name"] != "small" || got.body["vcpus"] != float64(2) || got.body["memoryMib"] != "1024" {
		t.Fatalf("GET /v1/flavors/small: %s", got.raw)
	}
	list := w.do(t, admin, "GET", "/v1/flavors", "")
	if fl, _ := list.body["flavors"].([]any); len(fl) != 1 {
		t.Fatalf("GET /v1/flavors: %s", list.raw)
	}
	w.do(t, admin, "POST", "/v1/flavors", `{"name":"small","vcpus":2,"memoryMib":1024,"diskGib":5}`).
		want(t, http.StatusConflict, "small")
	w.do(t, admin, "POST", "/v1/flavors", `{"name":"Bad_Name","vcpus":1,"memoryMib":512,"diskGib":1}`).
		want(t, http.StatusBadRequest, "not a DNS label")
	// A misspelt field is refused, as the gRPC API refuses unknown fields.
	w.do(t, admin, "POST", "/v1/flavors", `{"name":"other","vcpu":1,"memoryMib":512,"diskGib":1}`).
		want(t, http.StatusBadRequest, "vcpu")
	w.do(t, admin, "GET", "/v1/flavors/nope", "").want(t, http.StatusNotFound, "nope")
	w.do(t, admin, "DELETE", "/v1/flavors/small", "").want(t, http.StatusOK, "")
	w.do(t, admin, "GET", "/v1/flavors/small", "").want(t, http.StatusNotFound, "small")
}

func TestOversizedBody(t *testing.T) {
	// The HTTP bound is the gRPC one (kept apart so that the gateway does
	// not link the server).
	if httpapi.DefaultMaxBodyBytes != apiserver.MaxRequestBytes {
		t.Fatalf("DefaultMaxBodyBytes %d, the API's MaxRequestBytes %d", httpapi.DefaultMaxBodyBytes, apiserver.MaxRequestBytes)
	}
	w := startWeb(t, httpapi.Config{})
	big := `{"name":"x","description":"` + strings.Repeat("a", httpapi.DefaultMaxBodyBytes) + `"}`
	w.do(t, w.api.AdminToken, "POST", "/v1/projects", big).want(t, http.StatusRequestEntityTooLarge, "larger than")

	// Without a Content-Length (chunked: the length of a MultiReader is
	// unknown), the body is cut off as it is read.
	resp := w.send(context.Background(), t, w.api.AdminToken, "POST", "/v1/projects", io.MultiReader(strings.NewReader(big)))
	resp.Body.Close()
	if resp.Request.ContentLength > 0 {
		t.Fatalf("request has a Content-Length %d: the test needs a chunked body", resp.Request.ContentLength)
	}
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked oversized body: %d, want 413", resp.StatusCode)
	}
	// Nothing was created.
	w.do(t, w.api.AdminToken, "GET", "/v1/projects/x", "").want(t, http.StatusNotFound, "")
}

// TestOpenAPIDocument: /openapi.json parses, and lists every HTTP binding
// of the protos, each under its operation id, with the bearer token as
// its security scheme; nothing else.
func TestOpenAPIDocument(t *testing.T) {
	w := startWeb(t, httpapi.Config{})
	resp := w.send(context.Background(), t, "", "GET", "/openapi.json", nil)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /openapi.json: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var doc struct {
		Swagger             string
		Info                struct{ Title, Version string }
		SecurityDefinitions map[string]struct{ Type, In, Name string }
		Paths               map[string]map[string]struct{ OperationID string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("/openapi.json does not parse: %v", err)
	}
	if doc.Swagger != "2.0" || doc.Info.Title != "minicloud API" || doc.Info.Version != "v1" {
		t.Fatalf("/openapi.json: swagger %q, info %+v", doc.Swagger, doc.Info)
	}
	if b := doc.SecurityDefinitions["bearer"]; b.Type != "apiKey" || b.In != "header" || b.Name != "Authorization" {
		t.Fatalf("/openapi.json: security definitions %+v", doc.SecurityDefinitions)
	}
	ops := 0
	for _, m := range doc.Paths {
		ops += len(m)
	}
	bound := 0
	for _, r := range rpcs(t) {
		if r.path == "" {
			continue
		}
		bound++
		op, ok := doc.Paths[openAPIPath(r.path)][r.verb]
		if !ok || op.OperationID != r.service+"_"+r.method {
			t.Errorf("/openapi.json: %s %s is %+v (found: %v), want operation %s_%s", r.verb, openAPIPath(r.path), op, ok, r.service, r.method)
		}
	}
	if ops != bound {
		t.Errorf("/openapi.json has %d operations, the protos %d bindings", ops, bound)
	}
}

func TestMounts(t *testing.T) {
	ui := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, `{"ui":true}`) })
	w := startWeb(t, httpapi.Config{Mounts: map[string]http.Handler{"/": ui}})
	if r := w.do(t, "", "GET", "/", ""); r.code != http.StatusOK || r.body["ui"] != true {
		t.Fatalf("GET / on the mounted UI: %d %s", r.code, r.raw)
	}
	// The API's paths stay the API's.
	w.do(t, "", "GET", "/v1/vms", "").want(t, http.StatusUnauthorized, "")
	if _, err := httpapi.NewHandler(context.Background(), httpapi.Config{API: nil}); err == nil {
		t.Fatal("NewHandler without an API connection succeeded")
	}
	// An API listening on every address (0.0.0.0) is dialled on loopback.
	_, port, _ := net.SplitHostPort(w.api.Addr)
	conn, err := httpapi.DialAPI(net.JoinHostPort("0.0.0.0", port), w.api.CA.Pool())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := minicloudv1.NewFlavorServiceClient(conn).ListFlavors(context.Background(), &minicloudv1.ListFlavorsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a call through DialAPI(0.0.0.0:port) without a token: %v, want Unauthenticated from the API", err)
	}
	for _, pattern := range []string{"/v1/", "/v1/ui", "GET /openapi.json", "PUT /v1/vms", "localhost/v1/", "DELETE  example.com/v1/x"} {
		if _, err := httpapi.NewHandler(context.Background(), httpapi.Config{API: conn, Mounts: map[string]http.Handler{pattern: ui}}); err == nil {
			t.Errorf("mounting %q over the API succeeded", pattern)
		}
	}
}
