package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/api/server/apiservertest"
)

// TestJoinTokenAndRevokeOverTLS drives the CLI in-process against a real
// API server on TLS: the CA comes from the config file, a plaintext CLI is
// told what to do, and join-token create prints the agent's command line.
func TestJoinTokenAndRevokeOverTLS(t *testing.T) {
	t.Parallel() // an API of its own (own etcd, ports, dirs), nothing on the host
	srv := apiservertest.StartTLS(t)
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, srv.CA.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte("endpoint: "+srv.Addr+"\nca: "+caFile+"\ntoken: "+srv.AdminToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"MINICLOUD_CONFIG": cfg}

	code, out, stderr := runCLI(t, env, "", "host", "join-token", "create", "--ttl", "30m")
	if code != 0 {
		t.Fatalf("join-token create: exit %d: %s", code, stderr)
	}
	cmdRE := regexp.MustCompile(`minicloudd agent --api ` + regexp.QuoteMeta(srv.Addr) + ` --host-name NAME --join [a-z0-9]{6}\.[a-z0-9]{16} --ca-hash ` + regexp.QuoteMeta(srv.CA.Hash()))
	if !cmdRE.MatchString(out) {
		t.Fatalf("join-token create printed:\n%s", out)
	}
	code, out, stderr = runCLI(t, env, "", "host", "join-token", "create", "-o", "json")
	var tok struct{ Token, CaHash string }
	if code != 0 || json.Unmarshal([]byte(out), &tok) != nil || tok.CaHash != srv.CA.Hash() || len(tok.Token) != 23 {
		t.Fatalf("join-token create -o json: exit %d %q %s", code, out, stderr)
	}

	// Without the CA the CLI speaks plaintext, and the API says why not.
	code, _, stderr = runCLI(t, map[string]string{"HOME": dir}, "", "--endpoint", srv.Addr, "host", "list")
	if code == 0 || !strings.Contains(stderr, "serves TLS only") || !strings.Contains(stderr, "--ca-cert") {
		t.Fatalf("plaintext CLI: exit %d %s", code, stderr)
	}
	// TLS without a token is refused too, and the CLI says how to get one.
	code, _, stderr = runCLI(t, map[string]string{"HOME": dir}, "", "--endpoint", srv.Addr, "--ca-cert", caFile, "host", "list")
	if code == 0 || !strings.Contains(stderr, "no credentials") {
		t.Fatalf("CLI without a token: exit %d %s", code, stderr)
	}
	// A token without the CA is never sent.
	code, _, stderr = runCLI(t, map[string]string{"HOME": dir}, "", "--endpoint", srv.Addr, "--token", srv.AdminToken, "host", "list")
	if code == 0 || !strings.Contains(stderr, "sent over TLS only") {
		t.Fatalf("CLI with a token and no CA: exit %d %s", code, stderr)
	}
	// --ca-cert and --token work as the config file does.
	if code, _, stderr = runCLI(t, map[string]string{"HOME": dir}, "", "--endpoint", srv.Addr, "--ca-cert", caFile, "--token", srv.AdminToken, "host", "list"); code != 0 {
		t.Fatalf("--ca-cert --token: exit %d %s", code, stderr)
	}
	code, out, _ = runCLI(t, env, "", "host", "join-token", "list")
	if id := tok.Token[:6]; code != 0 || !strings.Contains(out, id) || strings.Contains(out, tok.Token[7:]) {
		t.Fatalf("join-token list: exit %d\n%s", code, out)
	}
	if code, out, _ = runCLI(t, env, "", "host", "join-token", "delete", tok.Token[:6]); code != 0 || !strings.Contains(out, "join token "+tok.Token[:6]+" deleted") {
		t.Fatalf("join-token delete: exit %d %s", code, out)
	}
	code, _, stderr = runCLI(t, env, "", "host", "revoke", "h9")
	if code != exitNotFound || !strings.Contains(stderr, "host h9 holds no certificate") {
		t.Fatalf("revoke unknown host: exit %d %s", code, stderr)
	}
}
