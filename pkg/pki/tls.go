package pki

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// ServerTLS is the configuration of a TLS listener that presents
// certPEM/keyPEM (the chain up to the CA, so that a joining host can pin
// the CA) and verifies client certificates against clientCAs. With
// clientOrg empty, a client without a certificate is let through (the API
// decides per call what it needs); otherwise the client must present a
// certificate of that organisation (an agent accepts only the control
// plane). A certificate the CA did not sign is refused in the handshake
// either way.
func ServerTLS(certPEM, keyPEM []byte, clientCAs *x509.CertPool, clientOrg string) (*tls.Config, error) {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("server certificate: %w", err)
	}
	c := &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    clientCAs,
		MinVersion:   tls.VersionTLS13,
	}
	if clientOrg != "" {
		c.ClientAuth = tls.RequireAndVerifyClientCert
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !HasOrg(cs.PeerCertificates[0], clientOrg) {
				return fmt.Errorf("client certificate is not a %s certificate", clientOrg)
			}
			return nil
		}
	}
	return c, nil
}

// ClientTLS is the configuration of a client that trusts roots and wants
// the server's certificate to carry the organisation wantOrg (so a host's
// certificate, also signed by the cluster CA, can never pass for the API).
// cert, if set, is presented as the client certificate.
func ClientTLS(roots *x509.CertPool, cert *tls.Certificate, wantOrg string) *tls.Config {
	c := &tls.Config{
		RootCAs:    roots,
		MinVersion: tls.VersionTLS13,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !HasOrg(cs.PeerCertificates[0], wantOrg) {
				return fmt.Errorf("server certificate is not a %s certificate", wantOrg)
			}
			return nil
		},
	}
	if cert != nil {
		c.Certificates = []tls.Certificate{*cert}
	}
	return c
}

// PinnedClientTLS is how a joining host first reaches the API, before it
// trusts anything: the server's chain must contain a CA whose public key
// hashes to caHash (CA.Hash), and the server's certificate must verify
// against that CA for the name dialled and carry OrgControlPlane. This is
// kubeadm's --discovery-token-ca-cert-hash, checked in the handshake
// itself so no byte of the token leaves the host before the API is proven.
func PinnedClientTLS(caHash string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Verification is done below against the pinned CA instead of the
		// system roots.
		InsecureSkipVerify: true, //nolint:gosec // see VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the API presented no certificate")
			}
			var ca *x509.Certificate
			for _, c := range cs.PeerCertificates[1:] {
				if c.IsCA && Hash(c) == caHash {
					ca = c
				}
			}
			if ca == nil {
				return fmt.Errorf("the API's certificate chain holds no CA with hash %s: wrong --ca-hash, or not the minicloud API you meant", caHash)
			}
			roots := x509.NewCertPool()
			roots.AddCert(ca)
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: hostOnly(cs.ServerName), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("the API's certificate does not verify against the pinned CA: %w", err)
			}
			if !HasOrg(leaf, OrgControlPlane) {
				return fmt.Errorf("the API's certificate is not a %s certificate", OrgControlPlane)
			}
			return nil
		},
	}
}

func hostOnly(serverName string) string {
	if h, _, err := net.SplitHostPort(serverName); err == nil {
		return h
	}
	return serverName
}

// PeerCert returns the verified client certificate of a gRPC call, or nil
// when the call came without TLS or without a client certificate.
func PeerCert(ctx context.Context) *x509.Certificate {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return nil
	}
	return info.State.VerifiedChains[0][0]
}

// IsLoopback says whether a listen or dial address (host:port) is on the
// loopback interface: only there may minicloud talk without TLS.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ClientTLSFromFile is ClientTLS for a client of the API (the CLI, a
// script, the lab) that trusts the cluster CA in caFile (the API writes it
// to DATA_DIR/ca.crt) and presents no certificate.
func ClientTLSFromFile(caFile string) (*tls.Config, error) {
	data, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	ca, err := ParseCert(data)
	if err != nil {
		return nil, fmt.Errorf("cluster CA %s: %w", caFile, err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	return ClientTLS(roots, nil, OrgControlPlane), nil
}
