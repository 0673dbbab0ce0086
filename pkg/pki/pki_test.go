package pki_test

import (
	"crypto/tls"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/minicloud/minicloud/pkg/pki"
)

func mustCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestCARoundTripAndHash(t *testing.T) {
	ca := mustCA(t)
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	back, err := pki.LoadCA(ca.CertPEM, keyPEM)
	if err != nil || back.Hash() != ca.Hash() {
		t.Fatalf("load: %v", err)
	}
	if !regexp.MustCompile(`^sha256:[0-9a-f]{64}$`).MatchString(ca.Hash()) {
		t.Fatalf("hash %q", ca.Hash())
	}
	other := mustCA(t)
	otherKey, _ := other.KeyPEM()
	if _, err := pki.LoadCA(ca.CertPEM, otherKey); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched key: %v", err)
	}
}

func TestSignedHostCertificate(t *testing.T) {
	ca := mustCA(t)
	key, _ := pki.NewKey()
	csrPEM, err := pki.NewCSR(key, "ignored")
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.ParseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Sign(csr.PublicKey, pki.Template{CommonName: "h1", Organization: pki.OrgHosts, DNSNames: []string{"h1"}, Client: true, Server: true, Lifetime: 100 * 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "h1" || !pki.HasOrg(cert, pki.OrgHosts) || pki.HasOrg(cert, pki.OrgControlPlane) {
		t.Fatalf("subject %v", cert.Subject)
	}
	if cert.NotAfter.After(ca.Cert.NotAfter) {
		t.Fatal("a certificate outlives its CA")
	}
	if _, err := pki.ParseCSR([]byte(strings.Repeat("x", 20000))); err == nil {
		t.Fatal("an oversized CSR was parsed")
	}
	tampered := []byte(strings.Replace(string(csrPEM), "A", "B", 1))
	if _, err := pki.ParseCSR(tampered); err == nil {
		t.Fatal("a tampered CSR was accepted")
	}
}

// serve runs a TLS server with the chain and answers one handshake.
func serve(t *testing.T, certPEM, keyPEM []byte) string {
	t.Helper()
	cfg, err := pki.ServerTLS(certPEM, keyPEM, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	return lis.Addr().String()
}

func handshake(addr string, cfg *tls.Config) error {
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return err
	}
	return c.Close()
}

func TestPinnedAndCAVerifiedClients(t *testing.T) {
	ca := mustCA(t)
	ip := []net.IP{net.ParseIP("127.0.0.1")}
	apiCert, apiKey, _ := ca.Issue(pki.Template{CommonName: "api", Organization: pki.OrgControlPlane, IPs: ip, Server: true, Lifetime: time.Hour})
	hostCert, hostKey, _ := ca.Issue(pki.Template{CommonName: "h1", Organization: pki.OrgHosts, IPs: ip, Server: true, Client: true, Lifetime: time.Hour})
	api, impostor := serve(t, apiCert, apiKey), serve(t, hostCert, hostKey)

	if err := handshake(api, pki.PinnedClientTLS(ca.Hash())); err != nil {
		t.Fatalf("pinned: %v", err)
	}
	if err := handshake(api, pki.PinnedClientTLS(mustCA(t).Hash())); err == nil || !strings.Contains(err.Error(), "holds no CA with hash") {
		t.Fatalf("wrong pin: %v", err)
	}
	if err := handshake(api, pki.ClientTLS(ca.Pool(), nil, pki.OrgControlPlane)); err != nil {
		t.Fatalf("CA-verified: %v", err)
	}
	// A host's certificate, though signed by the same CA, is not the API.
	if err := handshake(impostor, pki.PinnedClientTLS(ca.Hash())); err == nil || !strings.Contains(err.Error(), "not a minicloud:control-plane certificate") {
		t.Fatalf("host certificate passed for the API (pinned): %v", err)
	}
	if err := handshake(impostor, pki.ClientTLS(ca.Pool(), nil, pki.OrgControlPlane)); err == nil {
		t.Fatal("host certificate passed for the API")
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8640": true, "[::1]:1": true, "localhost:1": true, "127.0.0.2:1": true,
		"0.0.0.0:8640": false, "10.0.0.1:1": false, "api.example:1": false, ":8640": false,
	} {
		if got := pki.IsLoopback(addr); got != want {
			t.Errorf("IsLoopback(%q) = %v", addr, got)
		}
	}
}
