// Package cloudtest runs a real minicloud for end-to-end tests: it builds
// the minicloud and minicloudd binaries, starts `minicloudd all-in-one` as a
// child process on free loopback ports against an etcd the test owns, and
// can kill -9 and restart it on the same state. Nothing in it is faked.
package cloudtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/pki"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Binaries builds minicloud and minicloudd once per test binary and returns
// their paths. With MINICLOUD_TEST_BIN_DIR set (hack/test.sh builds them
// once for every package of a run), the binaries there are used instead.
func Binaries(t testing.TB) (cli, daemon string) {
	t.Helper()
	if dir := os.Getenv("MINICLOUD_TEST_BIN_DIR"); dir != "" {
		cli, daemon = filepath.Join(dir, "minicloud"), filepath.Join(dir, "minicloudd")
		for _, p := range []string{cli, daemon} {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("MINICLOUD_TEST_BIN_DIR: %v", err)
			}
		}
		return cli, daemon
	}
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "minicloud-bin-")
		if buildErr != nil {
			return
		}
		for _, name := range []string{"minicloud", "minicloudd"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, name), "./cmd/"+name)
			cmd.Dir = RepoRoot()
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build ./cmd/%s: %w\n%s", name, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatalf("build binaries: %v", buildErr)
	}
	return filepath.Join(binDir, "minicloud"), filepath.Join(binDir, "minicloudd")
}

// TinyImage builds (or, from its cache, reuses) the tiny guest image with
// hack/images/build-tiny.sh and returns its directory (disk.qcow2, vmlinuz,
// initrd.img, cmdline).
func TinyImage(t testing.TB) string {
	t.Helper()
	root := RepoRoot()
	cmd := exec.Command(filepath.Join(root, "hack/images/build-tiny.sh"))
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build tiny image: %v\n%s", err, out)
	}
	return filepath.Join(root, "images/out/tiny")
}

// RemoveBinaries deletes what Binaries built. Call it from TestMain after
// m.Run, or every test binary leaves a copy of both binaries in $TMPDIR.
func RemoveBinaries() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}

// syncBuffer is a bytes.Buffer safe for the child's writes and our reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Cloud is one running all-in-one.
type Cloud struct {
	t        testing.TB
	CLI      string
	Daemon   string
	Endpoint string
	// Web is the address of the web listener (--web-listen: the web
	// console and the HTTP/JSON API, HTTPS with the API's certificate), a
	// free port like Endpoint's, so a test never takes 8644 from `make up`.
	Web string
	// DataDir is world-traversable (unlike t.TempDir) so QEMU's
	// unprivileged user can open the VM disks below it.
	DataDir string
	EtcdURL string
	Etcd    *clientv3.Client
	Client  *client.Client
	Args    []string // extra minicloudd flags
	// Role is the minicloudd subcommand Run starts: "all-in-one" (Start) or
	// "api" (StartAPI).
	Role string

	log    *syncBuffer
	proc   *exec.Cmd
	exited chan struct{}
}

// Start builds the binaries, starts an embedded etcd owned by the test and
// an all-in-one on it, and waits until the API is healthy. Everything is
// stopped and removed when the test ends.
func Start(t testing.TB, extraArgs ...string) *Cloud {
	t.Helper()
	return start(t, "all-in-one", extraArgs)
}

// StartAPI is Start with `minicloudd api` alone: VMs are stored but never
// scheduled or booted, for tests of the API and CLI that must not touch
// the host.
func StartAPI(t testing.TB, extraArgs ...string) *Cloud {
	t.Helper()
	return start(t, "api", extraArgs)
}

// StartAPIReplicas starts n `minicloudd api` processes on one etcd the test
// owns, as replicas of one control plane: each has its own data directory
// and port, and all share one image store directory (as they would share
// an object store or a network file system on real machines). Kill one to
// test failover; Endpoints joins their addresses for a client.
func StartAPIReplicas(t testing.TB, n int, extraArgs ...string) []*Cloud {
	t.Helper()
	etcd, etcdClient := etcdtest.Start(t)
	return StartAPIReplicasOn(t, "http://"+etcd.Endpoint, etcdClient, n, extraArgs...)
}

// Endpoints is the comma-separated list of the replicas' API addresses.
func Endpoints(cs []*Cloud) string {
	var eps []string
	for _, c := range cs {
		eps = append(eps, c.Endpoint)
	}
	return strings.Join(eps, ",")
}

func start(t testing.TB, role string, extraArgs []string) *Cloud {
	t.Helper()
	etcd, etcdClient := etcdtest.Start(t)
	return startOn(t, role, "http://"+etcd.Endpoint, etcdClient, extraArgs)
}

func startOn(t testing.TB, role, etcdURL string, etcdClient *clientv3.Client, extraArgs []string) *Cloud {
	t.Helper()
	cli, daemon := Binaries(t)
	dataDir, err := os.MkdirTemp("/var/tmp", "minicloud-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dataDir, 0o711); err != nil {
		t.Fatal(err)
	}
	c := &Cloud{
		t: t, CLI: cli, Daemon: daemon,
		Endpoint: FreeAddr(t),
		Web:      FreeAddr(t),
		DataDir:  dataDir,
		EtcdURL:  etcdURL,
		Etcd:     etcdClient,
		Args:     extraArgs,
		Role:     role,
	}
	t.Cleanup(func() {
		c.Stop()
		// A test that failed half-way leaves VMs behind: remove this
		// cloud's domains, taps and bridges as `make clean` does.
		purge := exec.Command(filepath.Join(RepoRoot(), "hack/down.sh"), "--purge")
		purge.Env = append(os.Environ(), "DATA_DIR="+dataDir)
		if out, err := purge.CombinedOutput(); err != nil {
			t.Logf("purge test cloud %s: %v\n%s", dataDir, err, out)
		}
		os.RemoveAll(dataDir)
	})
	c.Run()
	cl, err := client.Dial(context.Background(), c.Endpoint, c.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	c.Client = cl
	return c
}

// FreeAddr is a free loopback address (host:port) for a daemon to listen on.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Run starts minicloudd (again) on the same state and waits for health.
func (c *Cloud) Run() {
	t := c.t
	t.Helper()
	c.log = &syncBuffer{}
	role := c.Role
	if role == "" {
		role = "all-in-one"
	}
	args := append([]string{role,
		"--data-dir", c.DataDir, "--listen", c.Endpoint,
		"--etcd-endpoints", c.EtcdURL, "--metrics-listen", "", "--web-listen", c.Web}, c.Args...)
	c.proc = exec.Command(c.Daemon, args...)
	c.proc.Stdout, c.proc.Stderr = c.log, c.log
	if err := c.proc.Start(); err != nil {
		t.Fatalf("start minicloudd: %v", err)
	}
	exited := make(chan struct{})
	c.exited = exited
	go func(p *exec.Cmd) { _ = p.Wait(); close(exited) }(c.proc)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	// The API writes the CA and the admin's config before it listens.
	for {
		if _, err := os.Stat(c.AdminConfig()); err == nil {
			break
		}
		if ctx.Err() != nil {
			c.Stop()
			t.Fatalf("minicloudd wrote no %s\nlog:\n%s", c.AdminConfig(), c.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := grpc.NewClient("passthrough:///"+c.Endpoint, c.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		c.Stop()
		t.Fatalf("minicloudd did not become healthy: %v %v\nlog:\n%s", resp, err, c.log.String())
	}
}

// Kill kills the all-in-one with SIGKILL, as a crash would.
func (c *Cloud) Kill() {
	if c.proc == nil || c.proc.Process == nil {
		return
	}
	_ = c.proc.Process.Signal(syscall.SIGKILL)
	<-c.exited
}

// Stop sends SIGTERM and waits for a clean exit.
func (c *Cloud) Stop() {
	if c.proc == nil || c.proc.Process == nil {
		return
	}
	select {
	case <-c.exited:
		return
	default:
	}
	_ = c.proc.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(60 * time.Second):
		_ = c.proc.Process.Kill()
		<-c.exited
		c.t.Errorf("minicloudd did not stop within 60s of SIGTERM\nlog:\n%s", c.log.String())
	}
}

// AdminConfig is the CLI configuration with the admin's token that the
// API keeps in its data directory (as make up installs it for root).
func (c *Cloud) AdminConfig() string { return filepath.Join(c.DataDir, "admin.yaml") }

// CAFile is the cluster CA certificate the API wrote.
func (c *Cloud) CAFile() string { return filepath.Join(c.DataDir, "ca.crt") }

// AdminToken is the admin's bearer token from AdminConfig.
func (c *Cloud) AdminToken() string {
	c.t.Helper()
	cfg, err := client.LoadConfig(c.AdminConfig())
	if err != nil {
		c.t.Fatal(err)
	}
	return cfg.Token
}

// DialOptions are the admin's: TLS trusting the cluster CA, and the
// admin's token.
func (c *Cloud) DialOptions() []grpc.DialOption {
	c.t.Helper()
	return c.DialOptionsWithToken(c.AdminToken())
}

// DialOptionsWithToken are a user's dial options with token ("" for none).
func (c *Cloud) DialOptionsWithToken(token string) []grpc.DialOption {
	c.t.Helper()
	opts, err := client.UserDialOptions(c.CAFile(), token)
	if err != nil {
		c.t.Fatal(err)
	}
	return opts
}

// HostDialOptions are a SIMULATED host's (tests that speak the agent's
// protocol themselves): mTLS with a certificate for name issued straight
// from the cluster CA in etcd, as a join would give it.
func (c *Cloud) HostDialOptions(name string) []grpc.DialOption {
	c.t.Helper()
	ca, err := apiserver.EnsureCA(context.Background(), c.Etcd)
	if err != nil {
		c.t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue(pki.Template{CommonName: name, Organization: pki.OrgHosts, Client: true, Lifetime: time.Hour})
	if err != nil {
		c.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		c.t.Fatal(err)
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(ca.Pool(), &pair, pki.OrgControlPlane)))}
}

// Log is what the all-in-one printed since it was last started.
func (c *Cloud) Log() string { return c.log.String() }

// MC runs the minicloud CLI against this cloud.
func (c *Cloud) MC(args ...string) (stdout, stderr string, code int) {
	cmd := exec.Command(c.CLI, args...)
	cmd.Env = []string{"MINICLOUD_ENDPOINT=" + c.Endpoint, "MINICLOUD_CONFIG=" + c.AdminConfig(), "HOME=" + c.DataDir, "PATH=" + os.Getenv("PATH")}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
		errOut.WriteString(err.Error())
	}
	return out.String(), errOut.String(), code
}

// MustMC runs the CLI and fails the test unless it exits 0.
func (c *Cloud) MustMC(args ...string) string {
	c.t.Helper()
	out, errOut, code := c.MC(args...)
	if code != 0 {
		c.t.Fatalf("minicloud %v: exit %d\nstdout: %s\nstderr: %s", args, code, out, errOut)
	}
	return out
}

// WaitHostUp waits until the all-in-one's agent has registered its host and
// the host is UP, so the scheduler can place VMs.
func (c *Cloud) WaitHostUp() {
	c.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := c.Client.Hosts.ListHosts(context.Background(), &minicloudv1.ListHostsRequest{})
		if err == nil {
			for _, h := range resp.GetHosts() {
				if h.GetState() == minicloudv1.HostState_HOST_STATE_UP {
					return
				}
			}
		}
		// Registration has no watch in the API; ask again shortly.
		time.Sleep(200 * time.Millisecond)
	}
	c.t.Fatalf("no host came up within 60s\nlog:\n%s", c.Log())
}

// ImportImage imports the built image in dir (disk.qcow2, vmlinuz,
// initrd.img, cmdline: what TinyImage returns) as image name.
func (c *Cloud) ImportImage(name, dir string) {
	c.t.Helper()
	cmdline, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil {
		c.t.Fatal(err)
	}
	c.MustMC("image", "create", name, "--file", filepath.Join(dir, "disk.qcow2"),
		"--kernel", filepath.Join(dir, "vmlinuz"), "--initrd", filepath.Join(dir, "initrd.img"),
		"--cmdline", strings.TrimSpace(string(cmdline)))
}

// RequireHypervisorHost skips t unless this machine can run the VMs of an
// end-to-end test: not -short, root (libvirt, bridges, nftables), and a
// running libvirtd.
func RequireHypervisorHost(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end VM test: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("end-to-end VM test needs root (libvirt, bridges, nftables)")
	}
	if _, err := os.Stat("/var/run/libvirt/libvirt-sock"); err != nil {
		t.Skip("libvirtd is not running (hack/setup-host.sh starts it)")
	}
}
