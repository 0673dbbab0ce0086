package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

// cloud is a real `minicloudd all-in-one` (embedded etcd, API, scheduler,
// agent, metadata) run as a child process on free loopback ports with a
// data directory of its own, so it never meets a `make up` cloud or a test
// run on the same machine. It is what pkg/cloudtest does for tests, without
// a testing.TB: a harness reports errors instead of failing a test.
type cloud struct {
	cli, daemon string
	dataDir     string
	endpoint    string
	// agentMetrics is the agent's /metrics address (loopback).
	agentMetrics string
	logPath      string
	client       *client.Client

	proc   *exec.Cmd
	exited chan struct{}
}

// repoRoot is the repository's top directory (this file is hack/agentbench/cloud.go).
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// buildBinaries builds minicloud and minicloudd into dir.
func buildBinaries(ctx context.Context, dir string) (cli, daemon string, err error) {
	for _, name := range []string{"minicloud", "minicloudd"} {
		cmd := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(dir, name), "./cmd/"+name)
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build ./cmd/%s: %w\n%s", name, err, out)
		}
	}
	return filepath.Join(dir, "minicloud"), filepath.Join(dir, "minicloudd"), nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startCloud starts the all-in-one and waits until its API is healthy and
// its agent's host is UP.
func startCloud(ctx context.Context, cli, daemon string) (*cloud, error) {
	// Under /var/tmp and 0711 (not a 0700 temp dir): QEMU's unprivileged
	// user must traverse down to the VM disks.
	dataDir, err := os.MkdirTemp("/var/tmp", "agentbench-")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dataDir, 0o711); err != nil {
		return nil, err
	}
	c := &cloud{cli: cli, daemon: daemon, dataDir: dataDir, logPath: dataDir + ".log"}
	if c.endpoint, err = freeAddr(); err != nil {
		return nil, err
	}
	if c.agentMetrics, err = freeAddr(); err != nil {
		return nil, err
	}
	if err := c.start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// start runs the all-in-one on the cloud's data directory and addresses
// (again, after restart killed it) and waits until it serves.
func (c *cloud) start(ctx context.Context) error {
	// Appended to: a restart's log follows the first run's.
	logFile, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child holds its own descriptor
	c.proc = exec.Command(c.daemon, "all-in-one",
		"--data-dir", c.dataDir, "--listen", c.endpoint, "--metrics-listen", "", "--web-listen", "",
		"--agent-metrics-listen", c.agentMetrics,
		// Up to 50 1-vCPU guests on a 2-core machine (the density mode):
		// above the default 4.0.
		"--cpu-allocation-ratio", "32")
	c.proc.Stdout, c.proc.Stderr = logFile, logFile
	if err := c.proc.Start(); err != nil {
		return fmt.Errorf("start minicloudd: %w", err)
	}
	c.exited = make(chan struct{})
	go func(proc *exec.Cmd, exited chan struct{}) { _ = proc.Wait(); close(exited) }(c.proc, c.exited)

	if err := c.waitHealthy(ctx); err != nil {
		c.stop()
		return err
	}
	opts, err := adminDialOptions(c.dataDir)
	if err != nil {
		c.stop()
		return err
	}
	if c.client, err = client.Dial(ctx, c.endpoint, opts...); err != nil {
		c.stop()
		return err
	}
	if err := c.waitHostUp(ctx); err != nil {
		c.stop()
		return err
	}
	return nil
}

// kill ends the all-in-one with SIGKILL, as a crash would, and waits
// until it is gone; its VMs, data directory and addresses stay for start.
func (c *cloud) kill() {
	if c.client != nil {
		c.client.Close()
		c.client = nil
	}
	_ = c.proc.Process.Kill()
	<-c.exited
}

func (c *cloud) waitHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-c.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	// The API writes the CA and the admin's config before it listens.
	var opts []grpc.DialOption
	for {
		var err error
		if opts, err = adminDialOptions(c.dataDir); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("minicloudd wrote no admin config: %w; log: %s", err, c.logPath)
		case <-time.After(50 * time.Millisecond):
		}
	}
	conn, err := grpc.NewClient("passthrough:///"+c.endpoint, opts...)
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("minicloudd did not become healthy (%v, %v); log: %s", resp.GetStatus(), err, c.logPath)
	}
	return nil
}

// adminDialOptions are the admin's, from the config the API keeps in its
// data directory.
func adminDialOptions(dataDir string) ([]grpc.DialOption, error) {
	cfg, err := client.LoadConfig(filepath.Join(dataDir, "admin.yaml"))
	if err != nil {
		return nil, err
	}
	return cfg.DialOptions()
}

func (c *cloud) waitHostUp(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := c.client.Hosts.ListHosts(ctx, &minicloudv1.ListHostsRequest{})
		if err == nil {
			for _, h := range resp.GetHosts() {
				if h.GetState() == minicloudv1.HostState_HOST_STATE_UP {
					return nil
				}
			}
		}
		// Host registration has no watch in the API: ask again shortly.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.exited:
			return fmt.Errorf("minicloudd exited; log: %s", c.logPath)
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("no host came up within 60s; log: %s", c.logPath)
}

// mc runs the minicloud CLI against this cloud.
func (c *cloud) mc(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, c.cli, args...)
	cmd.Env = []string{"MINICLOUD_ENDPOINT=" + c.endpoint, "MINICLOUD_CONFIG=" + filepath.Join(c.dataDir, "admin.yaml"), "HOME=" + c.dataDir, "PATH=" + os.Getenv("PATH")}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("minicloud %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// stop sends SIGTERM and waits for a clean exit (SIGKILL after 60 s).
func (c *cloud) stop() error {
	if c.client != nil {
		c.client.Close()
	}
	if c.proc == nil || c.proc.Process == nil {
		return nil
	}
	select {
	case <-c.exited:
		return nil
	default:
	}
	_ = c.proc.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
		return nil
	case <-time.After(60 * time.Second):
		_ = c.proc.Process.Kill()
		<-c.exited
		return errors.New("minicloudd did not stop within 60s of SIGTERM; killed")
	}
}

// remove deletes the data directory and the log. After a failed run it
// first purges whatever the stopped cloud may have left on the host
// (domains, taps, bridges), as `make clean` does, and keeps the log.
func (c *cloud) remove(failed bool) {
	if failed {
		cmd := exec.Command(filepath.Join(repoRoot(), "hack/down.sh"), "--purge")
		cmd.Env = append(os.Environ(), "DATA_DIR="+c.dataDir)
		if out, err := cmd.CombinedOutput(); err != nil {
			logf("purge %s: %v\n%s", c.dataDir, err, out)
		}
	}
	os.RemoveAll(c.dataDir)
	if !failed {
		os.Remove(c.logPath)
	}
}
