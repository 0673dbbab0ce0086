package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/minicloud/minicloud/api/server/apiservertest"
)

// TestIdentityJWKS: the CLI prints the key set a verifier needs, as
// standard JSON (go-jose reads it back as one public RS256 key).
func TestIdentityJWKS(t *testing.T) {
	t.Parallel() // an API of its own (own etcd, ports, dirs), nothing on the host
	srv := apiservertest.StartTLS(t)
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, srv.CA.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"HOME": dir}
	code, out, stderr := runCLI(t, env, "", "--endpoint", srv.Addr, "--ca-cert", caFile, "--token", srv.AdminToken, "identity", "jwks")
	if code != 0 {
		t.Fatalf("identity jwks: exit %d: %s", code, stderr)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal([]byte(out), &set); err != nil {
		t.Fatalf("identity jwks printed %q: %v", out, err)
	}
	if len(set.Keys) != 1 || !set.Keys[0].IsPublic() || set.Keys[0].Algorithm != "RS256" || set.Keys[0].KeyID == "" {
		t.Fatalf("identity jwks printed %s", out)
	}
}
