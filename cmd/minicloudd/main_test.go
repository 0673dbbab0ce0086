package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestAllInOneServesAndStops runs the all-in-one (embedded etcd on free
// ports) through its command line, creates a flavor, and checks that
// cancelling (what SIGTERM does) shuts it down cleanly; a second start on
// the same data directory still has the flavor.
func TestAllInOneServesAndStops(t *testing.T) {
	dir := t.TempDir()
	listen, web := freeAddr(t), freeAddr(t)
	start := func() (cancel func() error) {
		ctx, stop := context.WithCancel(context.Background())
		cmd := newRootCommand()
		cmd.SetArgs([]string{"all-in-one", "--data-dir", dir, "--listen", listen, "--metrics-listen", "",
			"--web-listen", web, "--log-level", "error"})
		errc := make(chan error, 1)
		go func() { errc <- cmd.ExecuteContext(ctx) }()
		return func() error {
			stop()
			select {
			case err := <-errc:
				return err
			case <-time.After(30 * time.Second):
				t.Fatal("all-in-one did not stop within 30s of cancel")
				return nil
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stop := start()
	// The API serves TLS only, and only to callers with credentials: the
	// admin's, which it wrote to its data directory.
	var opts []grpc.DialOption
	var admin client.Config
	for ctx.Err() == nil {
		cfg, err := client.LoadConfig(filepath.Join(dir, adminConfigName))
		if err == nil {
			admin = cfg
			if opts, err = cfg.DialOptions(); err != nil {
				t.Fatal(err)
			}
			if fi, _ := os.Stat(filepath.Join(dir, adminConfigName)); fi.Mode().Perm() != 0o600 {
				t.Fatalf("admin config is %v, want 0600", fi.Mode().Perm())
			}
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := grpc.NewClient(listen, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("health: %v", err)
	}
	// Without the token, nothing but health is served.
	anon, err := grpc.NewClient(listen, opts[0])
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	if _, err := minicloudv1.NewFlavorServiceClient(anon).ListFlavors(ctx, &minicloudv1.ListFlavorsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("list flavors without a token: %v, want Unauthenticated", err)
	}
	ready := func() {
		t.Helper()
		// WaitForReady blocks until the server accepts connections.
		if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
			t.Fatalf("health: %v", err)
		}
	}

	ready()
	flavors := minicloudv1.NewFlavorServiceClient(conn)
	if _, err := flavors.CreateFlavor(ctx, &minicloudv1.CreateFlavorRequest{Name: "tiny", Vcpus: 1, MemoryMib: 256, DiskGib: 1}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	// The web listener serves the same API as HTTP/JSON, with the API's
	// certificate and the same token.
	caPEM, err := os.ReadFile(admin.CA)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+web+"/v1/flavors/tiny", nil)
	req.Header.Set("Authorization", "Bearer "+admin.Token)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET /v1/flavors/tiny on --web-listen: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var flavor struct {
		Meta struct{ Name string } `json:"meta"`
	}
	if err := json.Unmarshal(body, &flavor); resp.StatusCode != http.StatusOK || err != nil || flavor.Meta.Name != "tiny" {
		t.Fatalf("GET /v1/flavors/tiny on --web-listen: %d %s", resp.StatusCode, body)
	}
	// And the web console at /: a browser signs in with the token and
	// sees what the API holds.
	jar, _ := cookiejar.New(nil)
	hc.Jar = jar
	resp, err = hc.PostForm("https://"+web+"/login", url.Values{"token": {admin.Token}})
	if err != nil {
		t.Fatalf("sign in to the web console: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Request.URL.Path != "/" {
		t.Fatalf("sign in to the web console: %s at %s", resp.Status, resp.Request.URL)
	}
	if resp, err = hc.Get("https://" + web + "/flavors"); err != nil {
		t.Fatalf("GET /flavors: %v", err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "<td>tiny</td>") {
		t.Fatalf("GET /flavors on the web console: %s\n%s", resp.Status, body)
	}
	if err := stop(); err != nil {
		t.Fatalf("all-in-one exited with %v", err)
	}

	stop = start()
	defer stop()
	ready()
	if _, err := flavors.GetFlavor(ctx, &minicloudv1.GetFlavorRequest{Name: "tiny"}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("flavor lost across a restart: %v", err)
	}
}
