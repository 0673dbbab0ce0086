package client

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/minicloud/minicloud/api/imageservice"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

func TestParseEndpoints(t *testing.T) {
	for in, want := range map[string]string{
		"a:1":                      "a:1",
		" a:1 , b:2 ,":             "a:1 b:2",
		"a:1,b:2,a:1":              "a:1 b:2",
		"[::1]:8640,10.0.0.1:8640": "[::1]:8640 10.0.0.1:8640",
	} {
		got, err := ParseEndpoints(in)
		if err != nil || strings.Join(got, " ") != want {
			t.Errorf("ParseEndpoints(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", " , ", "a", "a:1,b", ":8640", "a:"} {
		if _, err := ParseEndpoints(in); !errdefs.IsInvalid(err) {
			t.Errorf("ParseEndpoints(%q): got %v, want invalid", in, err)
		}
	}
}

// replica is one in-process API replica: the real image service (on a
// shared etcd and blob directory) and the health service, as the API
// server registers them.
type replica struct {
	srv    *grpc.Server
	health *health.Server
	addr   string
	calls  atomic.Int64 // ImageService calls served
}

func startReplica(t *testing.T, svc *imageservice.Service) *replica {
	t.Helper()
	r := &replica{health: health.NewServer()}
	count := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if strings.Contains(info.FullMethod, "ImageService") {
			r.calls.Add(1)
		}
		return h(ctx, req)
	}
	r.srv = grpc.NewServer(
		grpc.ChainUnaryInterceptor(count, errdefs.UnaryServerInterceptor),
		grpc.ChainStreamInterceptor(errdefs.StreamServerInterceptor),
	)
	minicloudv1.RegisterImageServiceServer(r.srv, svc)
	healthpb.RegisterHealthServer(r.srv, r.health)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.addr = lis.Addr().String()
	go r.srv.Serve(lis)
	t.Cleanup(r.srv.Stop)
	return r
}

// TestFailoverInProcess: a client of two replicas keeps answering when
// one stops abruptly (connections cut, as a crash does) and when one says
// it is draining (NOT_SERVING), and fails with Unavailable only when none
// is left. The child-process version with SIGKILL is in cmd/minicloud.
func TestFailoverInProcess(t *testing.T) {
	_, etcd := etcdtest.Start(t)
	dir := filepath.Join(t.TempDir(), "images")
	a := startReplica(t, imageservice.New(imageservice.Config{Client: etcd, Dir: dir}))
	b := startReplica(t, imageservice.New(imageservice.Config{Client: etcd, Dir: dir}))
	c, err := Dial(context.Background(), a.addr+","+b.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	list := func(when string) {
		t.Helper()
		for range 20 { // round_robin: both replicas get calls
			if _, err := c.Images.ListImages(ctx, &minicloudv1.ListImagesRequest{}); err != nil {
				t.Fatalf("%s: %v", when, err)
			}
		}
	}
	// round_robin picks only READY connections, and a loaded machine may
	// take a moment to ready the second: keep calling until both served
	// (a balancer that sticks to one never gets there).
	for deadline := time.Now().Add(10 * time.Second); a.calls.Load() == 0 || b.calls.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("calls: A %d, B %d; round_robin should use both", a.calls.Load(), b.calls.Load())
		}
		list("both up")
	}
	// A drains (NOT_SERVING): health checking takes it out of rotation.
	// The change reaches the client asynchronously: once 20 calls in a
	// row missed A, it is out.
	a.health.Shutdown()
	out := false
	for range 500 {
		before := a.calls.Load()
		list("A draining")
		if a.calls.Load() == before {
			out = true
			break
		}
	}
	if !out {
		t.Fatal("A still gets calls after reporting NOT_SERVING")
	}
	a.srv.Stop()
	list("A stopped")
	b.srv.Stop()
	if _, err := c.Images.ListImages(ctx, &minicloudv1.ListImagesRequest{}); !errdefs.IsUnavailable(err) {
		t.Fatalf("no replica left: got %v, want unavailable", err)
	}
}
