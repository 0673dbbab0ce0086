package join_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/minicloud/minicloud/agent/join"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/apiserver/apiservertest"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

type api = apiservertest.TLSServer

func startAPI(t *testing.T) *api { return apiservertest.StartTLS(t) }

func token(t *testing.T, a *api) *minicloudv1.CreateJoinTokenResponse {
	t.Helper()
	resp, err := a.Hosts.CreateJoinToken(context.Background(), &minicloudv1.CreateJoinTokenRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestJoinKeepsCredentialsAndReusesThemOnRestart(t *testing.T) {
	a := startAPI(t)
	dir := filepath.Join(t.TempDir(), "pki")
	tok := token(t, a)
	opts := join.Options{Dir: dir, HostName: "h1", API: a.Addr, Token: tok.Token, CAHash: tok.CaHash}

	// Not joined, no token: a message that says what to do.
	if _, err := join.Ensure(context.Background(), join.Options{Dir: dir, HostName: "h1", API: a.Addr}); err == nil || !strings.Contains(err.Error(), "--join TOKEN --ca-hash HASH") {
		t.Fatalf("no token: %v", err)
	}
	// A wrong pin: the token is never sent, nothing is written.
	bad := opts
	bad.CAHash = "sha256:" + strings.Repeat("0", 64)
	if _, err := join.Ensure(context.Background(), bad); err == nil || !strings.Contains(err.Error(), "holds no CA with hash") {
		t.Fatalf("wrong pin: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a failed join left %s behind: %v", dir, err)
	}

	creds, err := join.Ensure(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if creds.Leaf.Subject.CommonName != "h1" || !pki.HasOrg(creds.Leaf, pki.OrgHosts) {
		t.Fatalf("certificate subject %v", creds.Leaf.Subject)
	}
	for _, f := range []string{join.CAFile, join.CertFile, join.KeyFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, fi.Mode(), err)
		}
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("credentials directory mode %v", fi.Mode())
	}

	// A restart: the same certificate, with the token spent and none given.
	again, err := join.Ensure(context.Background(), join.Options{Dir: dir, HostName: "h1", API: opts.API})
	if err != nil || again.Leaf.SerialNumber.Cmp(creds.Leaf.SerialNumber) != 0 {
		t.Fatalf("restart: %v", err)
	}
	// The kept credentials are those of h1 only.
	if _, err := join.Load(dir, "h2"); err == nil || !strings.Contains(err.Error(), `certificate of host "h1", not of "h2"`) {
		t.Fatalf("other name: %v", err)
	}

	// They work: h1 registers over mTLS.
	conn, err := grpc.NewClient(opts.API, grpc.WithTransportCredentials(credentials.NewTLS(creds.ClientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = minicloudv1.NewHostServiceClient(conn).RegisterHost(context.Background(), &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: "h1"}, Address: "127.0.0.1:1", Capacity: &minicloudv1.Resources{Vcpus: 1, MemoryMib: 512, DiskGib: 1}, Hypervisors: []string{"tcg"},
	}})
	if err != nil {
		t.Fatalf("register with the joined certificate: %v", err)
	}
	// And its server side accepts the control plane only.
	srvCfg, err := creds.ServerTLS()
	if err != nil || srvCfg.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("agent server TLS: %v %v", srvCfg, err)
	}
}

func TestJoinWithReusedTokenFails(t *testing.T) {
	a := startAPI(t)
	tok := token(t, a)
	api := a.Addr
	if _, err := join.Ensure(context.Background(), join.Options{Dir: filepath.Join(t.TempDir(), "a"), HostName: "h1", API: api, Token: tok.Token, CAHash: tok.CaHash}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "b")
	_, err := join.Ensure(context.Background(), join.Options{Dir: dir, HostName: "h2", API: api, Token: tok.Token, CAHash: tok.CaHash})
	if err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("reused token: %v", err)
	}
	// Several API replicas: a dead one is skipped.
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	tok = token(t, a)
	if _, err := join.Ensure(context.Background(), join.Options{Dir: filepath.Join(t.TempDir(), "c"), HostName: "h2", API: deadAddr + "," + a.Addr, Token: tok.Token, CAHash: tok.CaHash}); err != nil {
		t.Fatalf("join past a dead replica: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused join left %s behind", dir)
	}
}

// TestJoinWaitsOutTheOldAgentsLease: a host re-joining right after its
// previous agent stopped (data directory wiped) finds its name still UP
// for the rest of the lease; the join waits for it instead of failing.
func TestJoinWaitsOutTheOldAgentsLease(t *testing.T) {
	a := startAPI(t)
	ctx := context.Background()
	lease, err := a.Etcd.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Etcd.Put(ctx, store.HostAliveKey("h1"), "previous agent", clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(2 * time.Second)
		a.Etcd.Revoke(ctx, lease.ID)
	}()
	tok := token(t, a)
	creds, err := join.Ensure(ctx, join.Options{Dir: filepath.Join(t.TempDir(), "pki"), HostName: "h1", API: a.Addr, Token: tok.Token, CAHash: tok.CaHash})
	if err != nil || creds.Leaf.Subject.CommonName != "h1" {
		t.Fatalf("join after the old lease ended: %v", err)
	}
}
