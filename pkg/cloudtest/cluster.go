package cloudtest

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Proc is one child process of a test (an etcd member, a scheduler
// replica), killed when the test ends.
type Proc struct {
	Name   string
	cmd    *exec.Cmd
	log    *syncBuffer
	exited chan struct{}
}

// StartProc starts argv as a child process named name.
func StartProc(t testing.TB, name string, argv ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, log: &syncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(30 * time.Second):
			p.Kill()
		}
	})
	return p
}

// Kill kills the process with SIGKILL, as a crash would, and waits for it.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// Exited says whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Log is what the process printed.
func (p *Proc) Log() string { return p.log.String() }

// EtcdCluster is an etcd cluster of real etcd processes (Debian's
// etcd-server) on loopback, plaintext.
type EtcdCluster struct {
	Members []*Proc
	// ClientURLs are the members' client URLs, in member order.
	ClientURLs []string
	// Client talks to every member.
	Client *clientv3.Client
}

// StartEtcdCluster starts n etcd members as one new cluster and waits
// until it has a quorum. The test is skipped if etcd is not installed
// (hack/setup-host.sh installs etcd-server).
func StartEtcdCluster(t testing.TB, n int) *EtcdCluster {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("etcd is not installed (apt-get install etcd-server, see hack/setup-host.sh)")
	}
	dir := t.TempDir()
	peers := make([]string, n)
	c := &EtcdCluster{ClientURLs: make([]string, n)}
	var initial []string
	for i := range n {
		peers[i] = "http://" + FreeAddr(t)
		c.ClientURLs[i] = "http://" + FreeAddr(t)
		initial = append(initial, fmt.Sprintf("m%d=%s", i, peers[i]))
	}
	for i := range n {
		c.Members = append(c.Members, StartProc(t, fmt.Sprintf("etcd-m%d", i), bin,
			"--name", fmt.Sprintf("m%d", i),
			"--data-dir", filepath.Join(dir, fmt.Sprintf("m%d", i)),
			"--listen-client-urls", c.ClientURLs[i], "--advertise-client-urls", c.ClientURLs[i],
			"--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
			"--initial-cluster", strings.Join(initial, ","),
			"--initial-cluster-state", "new", "--initial-cluster-token", filepath.Base(dir),
			"--log-level", "error"))
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.ClientURLs, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	c.Client = cli
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := cli.Put(ctx, "/cloudtest/ready", "1")
		cancel()
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			for _, m := range c.Members {
				t.Logf("%s:\n%s", m.Name, m.Log())
			}
			t.Fatalf("etcd cluster of %d did not get a quorum: %v", n, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// URLs is the comma-separated list of client URLs (for --etcd-endpoints).
func (c *EtcdCluster) URLs() string { return strings.Join(c.ClientURLs, ",") }

// StartAPIReplicasOn is StartAPIReplicas on a given etcd (etcdURLs comma
// separated, cli a client of it).
func StartAPIReplicasOn(t testing.TB, etcdURLs string, cli *clientv3.Client, n int, extraArgs ...string) []*Cloud {
	t.Helper()
	images := t.TempDir()
	var cs []*Cloud
	for range n {
		args := append([]string{"--image-dir", images}, extraArgs...)
		cs = append(cs, startOn(t, "api", etcdURLs, cli, args))
	}
	return cs
}

// StartScheduler starts one `minicloudd scheduler` replica on etcdURLs.
func StartScheduler(t testing.TB, name, etcdURLs string, extraArgs ...string) *Proc {
	t.Helper()
	_, daemon := Binaries(t)
	return StartProc(t, name, append([]string{daemon, "scheduler", "--etcd-endpoints", etcdURLs, "--metrics-listen", ""}, extraArgs...)...)
}
