package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// metadataServer is an EC2/OpenStack-style metadata service on loopback
// that demands an IMDSv2 token and fails the first few requests, as a
// service that is still starting would.
func metadataServer(t *testing.T, failFirst int32) *httptest.Server {
	t.Helper()
	var calls atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "ttl missing", http.StatusBadRequest)
			return
		}
		w.Write([]byte("tok123"))
	})
	values := map[string]string{
		"/latest/meta-data/instance-id":    "6f1c2e4a-0000-4000-8000-000000000001",
		"/latest/meta-data/hostname":       "web1",
		"/latest/meta-data/local-ipv4":     "10.0.0.5",
		"/openstack/latest/meta_data.json": "{\n \"uuid\": \"6f1c2e4a-0000-4000-8000-000000000001\"\n}",
	}
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) <= failFirst {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		if r.Header.Get("X-aws-ec2-metadata-token") != "tok123" {
			http.Error(w, "token required", http.StatusUnauthorized)
			return
		}
		v, ok := values[r.URL.Path]
		if !ok {
			http.NotFound(w, r) // no user-data
			return
		}
		w.Write([]byte(v))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestProbePrintsMetadataBetweenMarkers(t *testing.T) {
	srv := metadataServer(t, 2)
	c := &client{base: srv.URL, attempts: 5, interval: 10 * time.Millisecond, http: srv.Client()}
	var out bytes.Buffer
	if err := c.run(context.Background(), &out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{
		"MINICLOUD-METADATA-BEGIN source=" + srv.URL + "\n",
		"instance-id: 6f1c2e4a-0000-4000-8000-000000000001\n",
		"user-data: <not found>\n",
		`meta_data.json: {"uuid":"6f1c2e4a-0000-4000-8000-000000000001"}`,
		"MINICLOUD-METADATA-END\n",
		"MINICLOUD-GUEST-READY instance-id=6f1c2e4a-0000-4000-8000-000000000001 hostname=web1 local-ipv4=10.0.0.5 source=metadata\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}

func TestProbeGivesUpWithAReason(t *testing.T) {
	srv := metadataServer(t, 1000)
	c := &client{base: srv.URL, attempts: 3, interval: time.Millisecond, http: srv.Client()}
	var out bytes.Buffer
	err := c.run(context.Background(), &out)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("run = %v, want a 503 error", err)
	}
	if strings.Contains(out.String(), "MINICLOUD-GUEST-READY") {
		t.Errorf("READY printed although metadata failed:\n%s", out.String())
	}
}

func TestConfigDriveLayouts(t *testing.T) {
	dir := t.TempDir()
	os2 := filepath.Join(dir, "os", "openstack", "latest")
	if err := os.MkdirAll(os2, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(os2, "meta_data.json"), []byte(`{"uuid": "abc", "name": "x"}`), 0o644)
	os.WriteFile(filepath.Join(os2, "user_data"), []byte("#cloud-config\n"), 0o644)
	nc := filepath.Join(dir, "nocloud")
	os.MkdirAll(nc, 0o755)
	os.WriteFile(filepath.Join(nc, "meta-data"), []byte("instance-id: 'def'\nlocal-hostname: y\n"), 0o644)

	for path, want := range map[string]string{
		filepath.Join(dir, "os"): "MINICLOUD-CONFIGDRIVE-READY instance-id=abc\n",
		nc:                       "MINICLOUD-CONFIGDRIVE-READY instance-id=def\n",
	} {
		var out bytes.Buffer
		if err := printConfigDrive(&out, path); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out.String(), want) || !strings.HasPrefix(out.String(), "MINICLOUD-CONFIGDRIVE-BEGIN\n") {
			t.Errorf("%s:\n%s", path, out.String())
		}
	}
	if err := printConfigDrive(&bytes.Buffer{}, t.TempDir()); err == nil {
		t.Error("an empty directory read as a config drive")
	}
}

// syncBuffer is a bytes.Buffer the watch goroutine writes while the test
// reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestWatchFollowsAttribute runs the watch against a GCE-style server
// whose long-poll answers when the value's ETag differs from last_etag,
// (the restart of the real service, and the probe asking again, are in
// agent/metadata_e2e_test.go).
func TestWatchFollowsAttribute(t *testing.T) {
	var (
		mu      sync.Mutex
		value   = "hello"
		changed = make(chan struct{})
		polls   atomic.Int32
	)
	etagOf := func(v string) string { return fmt.Sprintf("%x", sha256.Sum256([]byte(v)))[:8] }
	mux := http.NewServeMux()
	mux.HandleFunc("GET /computeMetadata/v1/instance/attributes/{key}", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Metadata-Flavor") != "Google" {
			http.Error(w, "no flavor", http.StatusForbidden)
			return
		}
		switch r.PathValue("key") {
		case "mc-watch":
			w.Write([]byte("greeting"))
			return
		case "mc-watch-timeout":
			w.Write([]byte("30"))
			return
		case "greeting":
		default:
			http.NotFound(w, r)
			return
		}
		if r.URL.Query().Get("wait_for_change") == "true" {
			polls.Add(1)
			mu.Lock()
			v, ch := value, changed
			mu.Unlock()
			if r.URL.Query().Get("last_etag") == etagOf(v) {
				select {
				case <-ch:
				case <-r.Context().Done():
					return
				}
			}
		}
		mu.Lock()
		v := value
		mu.Unlock()
		w.Header().Set("ETag", etagOf(v))
		w.Write([]byte(v))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	c := &client{base: srv.URL, attempts: 3, interval: 10 * time.Millisecond, http: srv.Client()}
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go c.watch(ctx, &out)

	waitFor := func(want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(out.String(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("output lacks %q:\n%s", want, out.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor(`MINICLOUD-WATCH key=greeting changed=false etag=` + etagOf("hello") + ` value="hello"`)
	for polls.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	value = "world"
	close(changed)
	changed = make(chan struct{})
	mu.Unlock()
	waitFor(`MINICLOUD-WATCH key=greeting changed=true etag=` + etagOf("world") + ` value="world"`)
	if n := strings.Count(out.String(), "MINICLOUD-WATCH key="); n != 2 {
		t.Errorf("%d answers, want 2 (start, change):\n%s", n, out.String())
	}
}

// TestChecksListenDialPing: the checks a lab test reads off the console, on
// loopback: a listener answers with the hostname, a dial reads it, a ping
// with Don't Fragment is answered, a bad size is refused,
// and a closed port fails.
func TestChecksListenDialPing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("ICMP needs a raw socket (root)")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	if err := listen(port, "probe-host"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if got, err := dial(ctx, "127.0.0.1:"+port); err != nil || !strings.Contains(got, "MINICLOUD-HELLO probe-host") {
		t.Errorf("dial: %q, %v", got, err)
	}
	if got, err := dial(ctx, "127.0.0.1:1"); err == nil {
		t.Errorf("dial to a closed port: %q", got)
	}
	if got, err := ping(ctx, "127.0.0.1/1422"); err != nil || !strings.Contains(got, "bytes=1422") {
		t.Errorf("ping: %q, %v", got, err)
	}
	// (Loopback's MTU fits any IPv4 packet; the lab test checks that a
	// payload over the guest's MTU fails with "message too long".)
	if got, err := ping(ctx, "127.0.0.1/x"); err == nil {
		t.Errorf("ping with a bad size: %q", got)
	}
}
