package main

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
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
	listen := freeAddr(t)
	start := func() (cancel func() error) {
		ctx, stop := context.WithCancel(context.Background())
		cmd := newRootCommand()
		cmd.SetArgs([]string{"all-in-one", "--data-dir", dir, "--listen", listen, "--metrics-listen", "",
			"--log-level", "error"})
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
	conn, err := grpc.NewClient(listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ready := func() {
		t.Helper()
		// WaitForReady blocks until the server accepts connections.
		if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
			t.Fatalf("health: %v", err)
		}
	}

	stop := start()
	ready()
	flavors := minicloudv1.NewFlavorServiceClient(conn)
	if _, err := flavors.CreateFlavor(ctx, &minicloudv1.CreateFlavorRequest{Name: "tiny", Vcpus: 1, MemoryMib: 256, DiskGib: 1}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
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
