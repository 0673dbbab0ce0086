package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

// cloud is a minicloudd all-in-one started by the harness on free loopback
// ports, with its own embedded etcd and data directory, so it never meets a
// `make up` cloud on the same machine.
type cloud struct {
	cli, daemon string
	dataDir     string
	endpoint    string
	proc        *exec.Cmd
	exited      chan struct{}
	client      *client.Client
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startCloud builds the binaries from repo and starts an all-in-one.
func startCloud(ctx context.Context, repo string) (*cloud, error) {
	bin, err := os.MkdirTemp("", "bootbench-bin-")
	if err != nil {
		return nil, err
	}
	for _, name := range []string{"minicloud", "minicloudd"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(bin, name), "./cmd/"+name)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build ./cmd/%s: %w\n%s", name, err, out)
		}
	}
	// QEMU's unprivileged user must traverse down to the VM disks.
	dataDir, err := os.MkdirTemp("/var/tmp", "bootbench-")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dataDir, 0o711); err != nil {
		return nil, err
	}
	c := &cloud{cli: filepath.Join(bin, "minicloud"), daemon: filepath.Join(bin, "minicloudd"), dataDir: dataDir}
	if c.endpoint, err = freePort(); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dataDir, "minicloudd.log"))
	if err != nil {
		return nil, err
	}
	c.proc = exec.Command(c.daemon, "all-in-one", "--data-dir", dataDir, "--listen", c.endpoint,
		"--metrics-listen", "", "--web-listen", "")
	c.proc.Stdout, c.proc.Stderr = logf, logf
	if err := c.proc.Start(); err != nil {
		return nil, fmt.Errorf("start minicloudd: %w", err)
	}
	c.exited = make(chan struct{})
	go func() { _ = c.proc.Wait(); logf.Close(); close(c.exited) }()

	hctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	// The API writes the CA and the admin's config (DATA_DIR/admin.yaml)
	// before it listens.
	var cfg client.Config
	for {
		if cfg, err = client.LoadConfig(filepath.Join(dataDir, "admin.yaml")); err == nil {
			break
		}
		select {
		case <-hctx.Done():
			c.stop()
			return nil, fmt.Errorf("minicloudd wrote no admin config: %w", err)
		case <-c.exited:
			return nil, fmt.Errorf("minicloudd exited; log: %s", filepath.Join(dataDir, "minicloudd.log"))
		case <-time.After(50 * time.Millisecond):
		}
	}
	opts, err := cfg.DialOptions()
	if err != nil {
		c.stop()
		return nil, err
	}
	if c.client, err = client.Dial(ctx, c.endpoint, opts...); err != nil {
		c.stop()
		return nil, err
	}
	resp, err := healthpb.NewHealthClient(c.client.Conn).Check(hctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		c.stop()
		return nil, fmt.Errorf("minicloudd did not become healthy (%v %v); log: %s", resp, err, filepath.Join(dataDir, "minicloudd.log"))
	}
	for {
		hosts, err := c.client.Hosts.ListHosts(hctx, &minicloudv1.ListHostsRequest{})
		if err == nil {
			for _, h := range hosts.GetHosts() {
				if h.GetState() == minicloudv1.HostState_HOST_STATE_UP {
					return c, nil
				}
			}
		}
		select {
		case <-hctx.Done():
			c.stop()
			return nil, fmt.Errorf("no host came up: %w", hctx.Err())
		case <-time.After(200 * time.Millisecond): // registration has no watch in the API
		}
	}
}

// mc runs the CLI against the cloud.
func (c *cloud) mc(args ...string) (string, error) {
	cmd := exec.Command(c.cli, args...)
	cmd.Env = []string{"MINICLOUD_ENDPOINT=" + c.endpoint, "MINICLOUD_CONFIG=" + filepath.Join(c.dataDir, "admin.yaml"), "HOME=" + c.dataDir, "PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("minicloud %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// stop ends the all-in-one (SIGTERM: it cleans up what it made) and removes
// its data.
func (c *cloud) stop() {
	if c.client != nil {
		c.client.Close()
	}
	if c.proc != nil && c.proc.Process != nil {
		_ = c.proc.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.exited:
		case <-time.After(60 * time.Second):
			_ = c.proc.Process.Kill()
			<-c.exited
		}
	}
	os.RemoveAll(c.dataDir)
	os.RemoveAll(filepath.Dir(c.cli))
}
