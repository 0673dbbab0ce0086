// Package pki is minicloud's cluster certificate authority: one CA, made
// once at the first start of the control plane, that signs the API
// servers' serving and client certificates and every host's certificate.
// It is built on the standard library's crypto/x509 only; where the CA
// lives (etcd) is the caller's business (pkg/store), not this package's.
//
// Who a certificate speaks for is in its subject: the organisation says
// the role (OrgHosts, OrgControlPlane), the common name says which host.
// Every certificate carries a random 128-bit serial, so a deny-list of
// serials can revoke one certificate without touching the others.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// Roles, carried as the certificate subject's organisation.
const (
	// OrgHosts marks a hypervisor host's certificate; its common name is
	// the host name (kubeadm's system:nodes group plays this part).
	OrgHosts = "minicloud:hosts"
	// OrgControlPlane marks an API server's serving and client
	// certificates.
	OrgControlPlane = "minicloud:control-plane"
)

// Lifetimes.
const (
	CALifetime = 10 * 365 * 24 * time.Hour
	// HostCertLifetime is a host certificate's validity: a year, as
	// kubeadm's; revocation (a serial deny-list) covers the loss of one
	// before it expires.
	HostCertLifetime = 365 * 24 * time.Hour
	// ControlPlaneCertLifetime: API servers issue theirs at every start
	// and keep them in memory only.
	ControlPlaneCertLifetime = 90 * 24 * time.Hour
	// clockSkew back-dates NotBefore so that a peer whose clock is a
	// little behind accepts a fresh certificate.
	clockSkew = 5 * time.Minute
)

// CA is the cluster's certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// CertPEM is Cert, PEM encoded (what clients are given to trust).
	CertPEM []byte
}

// NewCA makes a self-signed CA with a fresh ECDSA P-256 key.
func NewCA(name string) (*CA, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"minicloud"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CALifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: EncodeCert(der)}, nil
}

// LoadCA parses a CA from its PEM certificate and PEM (PKCS#8) key.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCert(certPEM)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("CA certificate is not a CA (basic constraints)")
	}
	key, err := ParseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, errors.New("CA key does not match the CA certificate")
	}
	return &CA{Cert: cert, Key: key, CertPEM: EncodeCert(cert.Raw)}, nil
}

// KeyPEM returns the CA's private key, PEM (PKCS#8).
func (ca *CA) KeyPEM() ([]byte, error) { return EncodeKey(ca.Key) }

// Pool is a cert pool holding only this CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// Hash is the pin of the CA: "sha256:" and the hex SHA-256 of its
// SubjectPublicKeyInfo, the format of kubeadm's
// --discovery-token-ca-cert-hash.
func (ca *CA) Hash() string { return Hash(ca.Cert) }

// Hash pins a certificate's public key (see CA.Hash).
func Hash(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Template says what a certificate is for.
type Template struct {
	// CommonName and Organization form the subject (who and which role).
	CommonName   string
	Organization string
	// DNSNames and IPs are the subject alternative names a serving
	// certificate is valid for.
	DNSNames []string
	IPs      []net.IP
	// Server and Client choose the extended key usages.
	Server, Client bool
	Lifetime       time.Duration
}

// Sign issues a certificate for pub as tmpl says and returns it parsed.
func (ca *CA) Sign(pub crypto.PublicKey, t Template) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	notAfter := now.Add(t.Lifetime)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: t.CommonName, Organization: []string{t.Organization}},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		DNSNames:     t.DNSNames,
		IPAddresses:  t.IPs,
	}
	if t.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if t.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", t.CommonName, err)
	}
	return x509.ParseCertificate(der)
}

// Issue makes a fresh key and a certificate for it: what an API server
// uses for itself. It returns the certificate and key PEM.
func (ca *CA) Issue(t Template) (certPEM, keyPEM []byte, err error) {
	key, err := NewKey()
	if err != nil {
		return nil, nil, err
	}
	cert, err := ca.Sign(key.Public(), t)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = EncodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return append(EncodeCert(cert.Raw), ca.CertPEM...), keyPEM, nil
}

// maxCSRBytes bounds a CSR a joining host may send.
const maxCSRBytes = 16 << 10

// ParseCSR parses a PEM certificate request and checks its self-signature
// (the requester holds the key).
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	if len(csrPEM) > maxCSRBytes {
		return nil, fmt.Errorf("certificate request is %d bytes, more than %d", len(csrPEM), maxCSRBytes)
	}
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("certificate request is not a PEM CERTIFICATE REQUEST block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse certificate request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("certificate request signature: %w", err)
	}
	return csr, nil
}

// NewCSR makes a PEM certificate request for key with the given common
// name (what a joining host sends; the CA decides everything else).
func NewCSR(key crypto.Signer, commonName string) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName, Organization: []string{OrgHosts}},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create certificate request: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// NewKey makes an ECDSA P-256 key.
func NewKey() (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return key, nil
}

// EncodeCert PEM-encodes a DER certificate.
func EncodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// EncodeKey PEM-encodes a private key (PKCS#8).
func EncodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseCert parses the first PEM certificate in data.
func ParseCert(data []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return x509.ParseCertificate(block.Bytes)
}

// ParseKey parses a PEM PKCS#8 private key.
func ParseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("no PEM PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key of type %T cannot sign", k)
	}
	return s, nil
}

// SerialString is how serials are written in etcd keys, logs and errors:
// lower-case hex.
func SerialString(cert *x509.Certificate) string { return cert.SerialNumber.Text(16) }

// HasOrg says whether the certificate's subject carries the organisation.
func HasOrg(cert *x509.Certificate, org string) bool {
	for _, o := range cert.Subject.Organization {
		if o == org {
			return true
		}
	}
	return false
}

func newSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("certificate serial: %w", err)
	}
	return serial, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}
