package lab

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/minicloud/minicloud/pkg/pki"
)

// The lab's etcd runs with TLS on both its client and peer ports, with
// certificates from a CA of the etcd cluster's own (pkg/pki: the standard
// library's crypto/x509, nothing hand-rolled): one certificate per member
// (server and client use, for its peers) and one client certificate for the
// API replicas and schedulers. This CA is not the cluster CA the API keeps
// in etcd for hosts and clients (ClusterCA): as on real machines, etcd's
// trust is set up before the control plane exists. Instance identity
// documents are signed with one Ed25519 key shared by every host, as on a
// real cloud.

func (l *Lab) etcdCA() string        { return filepath.Join(l.pkiDir(), "etcd-ca.pem") }
func (l *Lab) etcdCAKey() string     { return filepath.Join(l.pkiDir(), "etcd-ca-key.pem") }
func (l *Lab) etcdCert(i int) string { return filepath.Join(l.pkiDir(), fmt.Sprintf("etcd%d.pem", i)) }
func (l *Lab) etcdKey(i int) string {
	return filepath.Join(l.pkiDir(), fmt.Sprintf("etcd%d-key.pem", i))
}
func (l *Lab) etcdClientCert() string { return filepath.Join(l.pkiDir(), "etcd-client.pem") }
func (l *Lab) etcdClientKey() string  { return filepath.Join(l.pkiDir(), "etcd-client-key.pem") }
func (l *Lab) identityKey() string    { return filepath.Join(l.pkiDir(), "identity.pem") }

// etcdCertLifetime: a lab lives hours or days.
const etcdCertLifetime = 365 * 24 * time.Hour

// ensurePKI creates whatever certificate or key is missing.
func (l *Lab) ensurePKI() error {
	ca, err := l.loadOrCreateEtcdCA()
	if err != nil {
		return err
	}
	for i := 1; i <= etcdMembers; i++ {
		// etcd checks a peer's certificate against the address the
		// connection comes from, and on one machine every peer
		// connection to another control node's address leaves from the
		// router's (the bridge's primary address).
		ips := []net.IP{l.ControlAddr(i).AsSlice(), l.RouterAddr().AsSlice(), net.IPv4(127, 0, 0, 1)}
		name := fmt.Sprintf("etcd%d", i)
		if err := issue(ca, l.etcdCert(i), l.etcdKey(i), pki.Template{CommonName: name, Organization: "minicloud:etcd",
			DNSNames: []string{name, "localhost"}, IPs: ips, Server: true, Client: true, Lifetime: etcdCertLifetime}); err != nil {
			return err
		}
	}
	if err := issue(ca, l.etcdClientCert(), l.etcdClientKey(), pki.Template{CommonName: "minicloud",
		Organization: "minicloud:etcd-clients", Client: true, Lifetime: etcdCertLifetime}); err != nil {
		return err
	}
	if _, err := os.Stat(l.identityKey()); errors.Is(err, os.ErrNotExist) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return err
		}
		if err := os.WriteFile(l.identityKey(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return fmt.Errorf("identity key: %w", err)
		}
	}
	return nil
}

func (l *Lab) loadOrCreateEtcdCA() (*pki.CA, error) {
	if _, err := os.Stat(l.etcdCAKey()); errors.Is(err, os.ErrNotExist) {
		ca, err := pki.NewCA("minicloud lab " + l.Name + " etcd CA")
		if err != nil {
			return nil, err
		}
		key, err := ca.KeyPEM()
		if err != nil {
			return nil, err
		}
		// Key last: its presence means the pair is complete.
		if err := os.WriteFile(l.etcdCA(), ca.CertPEM, 0o644); err != nil {
			return nil, err
		}
		if err := os.WriteFile(l.etcdCAKey(), key, 0o600); err != nil {
			return nil, err
		}
		return ca, nil
	}
	certPEM, err := os.ReadFile(l.etcdCA())
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(l.etcdCAKey())
	if err != nil {
		return nil, err
	}
	return pki.LoadCA(certPEM, keyPEM)
}

// issue writes a key and a certificate signed by ca, unless the key exists.
func issue(ca *pki.CA, certPath, keyPath string, t pki.Template) error {
	if _, err := os.Stat(keyPath); err == nil {
		return nil
	}
	certPEM, keyPEM, err := ca.Issue(t)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certPath, certPEM, 0o600); err != nil {
		return err
	}
	return os.WriteFile(keyPath, keyPEM, 0o600)
}
