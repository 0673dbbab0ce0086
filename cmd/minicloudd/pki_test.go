package main

import (
	"context"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/pki"
)

// TestAPIPKIByListenAddress: the API serves TLS wherever it listens, with
// the cluster CA's certificate for the addresses clients dial (loopback
// included). Both replicas of one etcd get the same CA, written to
// DATA_DIR/ca.crt.
func TestAPIPKIByListenAddress(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()

	loop := apiFlags{listen: "127.0.0.1:8640", dataDir: t.TempDir()}
	var cfg apiserver.Config
	if err := setupAPIPKI(ctx, loop, cli, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.TLS == nil || cfg.CA == nil || cfg.AgentTLS == nil || len(cfg.AgentTLS.Certificates) != 1 {
		t.Fatalf("loopback API: TLS %v, CA %v, agent TLS %v", cfg.TLS != nil, cfg.CA != nil, cfg.AgentTLS != nil)
	}
	written, err := os.ReadFile(filepath.Join(loop.dataDir, caFileName))
	if err != nil || string(written) != string(cfg.CA.CertPEM) {
		t.Fatalf("ca.crt: %v", err)
	}

	// The web listener (--web-listen) serves the same certificate: its
	// address is a name of it too.
	wide := apiFlags{listen: "192.0.2.10:8640", webListen: "203.0.113.4:8644", dataDir: t.TempDir(), tlsSANs: []string{"api.example", "198.51.100.7"}}
	var cfg2 apiserver.Config
	if err := setupAPIPKI(ctx, wide, cli, &cfg2); err != nil {
		t.Fatal(err)
	}
	if cfg2.TLS == nil || cfg2.CA.Hash() != cfg.CA.Hash() {
		t.Fatalf("replica beyond loopback: TLS %v, same CA %v", cfg2.TLS != nil, cfg2.CA.Hash() == cfg.CA.Hash())
	}
	leaf, err := x509.ParseCertificate(cfg2.TLS.Certificates[0].Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if !pki.HasOrg(leaf, pki.OrgControlPlane) || !slices.Contains(leaf.DNSNames, "api.example") {
		t.Fatalf("serving certificate %v %v", leaf.Subject, leaf.DNSNames)
	}
	for _, ip := range []string{"192.0.2.10", "203.0.113.4", "198.51.100.7", "127.0.0.1"} {
		if !slices.ContainsFunc(leaf.IPAddresses, func(a net.IP) bool { return a.Equal(net.ParseIP(ip)) }) {
			t.Errorf("serving certificate lacks IP SAN %s: %v", ip, leaf.IPAddresses)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: cfg.CA.Pool(), DNSName: "192.0.2.10", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatal(err)
	}
}

// TestAgentWithoutCertificateIsToldToJoin: every agent, on loopback too,
// needs a host certificate; one without is told how to join.
func TestAgentWithoutCertificateIsToldToJoin(t *testing.T) {
	dir := t.TempDir()
	for _, listen := range []string{"127.0.0.1:0", "0.0.0.0:8642"} {
		_, err := hostCredentials(context.Background(), agentFlags{api: "127.0.0.1:8640", listen: listen, hostName: "h1"}, dir)
		if err == nil || !strings.Contains(err.Error(), "--join TOKEN --ca-hash HASH") {
			t.Fatalf("agent on %s without a certificate: %v", listen, err)
		}
	}
}

// TestAgentJoinsATLSAPIOnceAndReusesItsCertificate: the all-in-one's agent
// beyond loopback (its API on TLS) makes its own token in-process and joins
// with it; a restart reuses the certificate and makes no token.
func TestAgentJoinsATLSAPIOnceAndReusesItsCertificate(t *testing.T) {
	srv := apiservertest.StartTLS(t)
	calls := 0
	f := agentFlags{api: localAddr(srv.Addr), listen: "127.0.0.1:0", hostName: "h1",
		selfJoin: func(ctx context.Context) (string, string, error) {
			calls++
			token, _, err := apiserver.CreateJoinToken(ctx, srv.Etcd, time.Minute, "test")
			return token, srv.CA.Hash(), err
		}}
	dir := t.TempDir()
	first, err := hostCredentials(context.Background(), f, dir)
	if err != nil || first == nil || first.Leaf.Subject.CommonName != "h1" {
		t.Fatalf("first start: %v", err)
	}
	again, err := hostCredentials(context.Background(), f, dir)
	if err != nil || again.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) != 0 || calls != 1 {
		t.Fatalf("restart: %v, tokens made %d", err, calls)
	}
	if fi, err := os.Stat(filepath.Join(dir, "pki", "host.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("host key: %v", err)
	}
	if got := localAddr("0.0.0.0:8640"); got != "127.0.0.1:8640" {
		t.Fatalf("localAddr = %s", got)
	}
}
