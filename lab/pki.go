package lab

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// The lab's etcd runs with TLS on both its client and peer ports, with
// certificates from a CA of the lab's own (the standard library's
// crypto/x509; nothing hand-rolled): one certificate per member (server and
// client use, for its peers) and one client certificate for the API
// replicas and schedulers. Instance identity documents are signed with one
// Ed25519 key shared by every host, as on a real cloud.

func (l *Lab) caCert() string        { return filepath.Join(l.pkiDir(), "ca.pem") }
func (l *Lab) caKey() string         { return filepath.Join(l.pkiDir(), "ca-key.pem") }
func (l *Lab) etcdCert(i int) string { return filepath.Join(l.pkiDir(), fmt.Sprintf("etcd%d.pem", i)) }
func (l *Lab) etcdKey(i int) string {
	return filepath.Join(l.pkiDir(), fmt.Sprintf("etcd%d-key.pem", i))
}
func (l *Lab) etcdClientCert() string { return filepath.Join(l.pkiDir(), "etcd-client.pem") }
func (l *Lab) etcdClientKey() string  { return filepath.Join(l.pkiDir(), "etcd-client-key.pem") }
func (l *Lab) identityKey() string    { return filepath.Join(l.pkiDir(), "identity.pem") }
func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// ensurePKI creates whatever certificate or key is missing.
func (l *Lab) ensurePKI() error {
	ca, caKey, err := l.loadOrCreateCA()
	if err != nil {
		return err
	}
	for i := 1; i <= etcdMembers; i++ {
		// etcd checks a peer's certificate against the address the
		// connection comes from, and on one machine every peer
		// connection to another control node's address leaves from the
		// router's (the bridge's primary address).
		ips := []net.IP{l.ControlAddr(i).AsSlice(), l.RouterAddr().AsSlice(), net.IPv4(127, 0, 0, 1)}
		if err := issue(ca, caKey, l.etcdCert(i), l.etcdKey(i), fmt.Sprintf("etcd%d", i), ips,
			[]x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}); err != nil {
			return err
		}
	}
	if err := issue(ca, caKey, l.etcdClientCert(), l.etcdClientKey(), "minicloud", nil,
		[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}); err != nil {
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
		if err := writePEM(l.identityKey(), "PRIVATE KEY", der); err != nil {
			return fmt.Errorf("identity key: %w", err)
		}
	}
	return nil
}

func (l *Lab) loadOrCreateCA() (*x509.Certificate, *ecdsa.PrivateKey, error) {
	if _, err := os.Stat(l.caKey()); errors.Is(err, os.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "minicloud lab " + l.Name + " CA"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().AddDate(10, 0, 0),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			return nil, nil, fmt.Errorf("create lab CA: %w", err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		// Key last: its presence means the pair is complete.
		if err := writePEM(l.caCert(), "CERTIFICATE", der); err != nil {
			return nil, nil, err
		}
		if err := writePEM(l.caKey(), "PRIVATE KEY", kder); err != nil {
			return nil, nil, err
		}
	}
	cert, err := readCert(l.caCert())
	if err != nil {
		return nil, nil, err
	}
	key, err := readKey(l.caKey())
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// issue writes a certificate signed by ca for cn, unless the key exists.
func issue(ca *x509.Certificate, caKey *ecdsa.PrivateKey, certPath, keyPath, cn string, ips []net.IP, usage []x509.ExtKeyUsage) error {
	if _, err := os.Stat(keyPath); err == nil {
		return nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usage,
		IPAddresses:  ips,
		DNSNames:     []string{cn, "localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("certificate for %s: %w", cn, err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writePEM(certPath, "CERTIFICATE", der); err != nil {
		return err
	}
	return writePEM(keyPath, "PRIVATE KEY", kder)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	return x509.ParseCertificate(blk.Bytes)
}

func readKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an ECDSA key", path)
	}
	return ek, nil
}
