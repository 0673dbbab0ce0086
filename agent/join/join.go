// Package join is the host's side of the cluster PKI: kubeadm's TLS
// bootstrap. A new host makes a key, sends a certificate request with a
// one-time join token to the API (which it trusts only through the pinned
// hash of the cluster CA, or a CA file), and keeps the certificate, its
// key and the CA in its data directory. Every later start reuses them, so
// an agent restart needs no new token.
package join

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/pki"
)

// File names under Options.Dir.
const (
	CAFile   = "ca.crt"
	CertFile = "host.crt"
	KeyFile  = "host.key"
)

// Options say where the credentials live and how to get them.
type Options struct {
	// Dir holds ca.crt, host.crt and host.key (created 0700, files 0600).
	Dir string
	// HostName is the name the certificate must be for.
	HostName string
	// API is the address JoinHost is called on (host:port), or several
	// separated by commas (API replicas: tried in order until one
	// answers).
	API string
	// Token is the join token; only used when Dir holds no certificate.
	Token string
	// CAHash pins the cluster CA for the first contact ("sha256:<hex>",
	// printed by `minicloud host join-token create`). CAFile may be given
	// instead (a CA certificate obtained out of band).
	CAHash string
	CAFile string
	// Plaintext joins without TLS: only for an API on this very machine's
	// loopback (the all-in-one), where there is nothing to pin.
	Plaintext bool
	// DialOptions are added to the join connection's (e.g. a resolver for
	// several API endpoints); transport credentials are this package's.
	DialOptions []grpc.DialOption
}

// Credentials are a joined host's certificate and the CA it trusts.
type Credentials struct {
	Cert            tls.Certificate
	CertPEM, KeyPEM []byte
	CAs             *x509.CertPool
	Leaf            *x509.Certificate
}

// ClientTLS is the configuration for calling the API with these
// credentials: the API must show a control-plane certificate.
func (c *Credentials) ClientTLS() *tls.Config {
	return pki.ClientTLS(c.CAs, &c.Cert, pki.OrgControlPlane)
}

// ServerTLS is the configuration of the agent's own listener: mTLS that
// accepts only the control plane.
func (c *Credentials) ServerTLS() (*tls.Config, error) {
	return pki.ServerTLS(c.CertPEM, c.KeyPEM, c.CAs, pki.OrgControlPlane)
}

// Ensure returns the host's credentials: those in Dir if there are any,
// else the result of joining with Token.
func Ensure(ctx context.Context, o Options) (*Credentials, error) {
	creds, err := Load(o.Dir, o.HostName)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return creds, err
	}
	if o.Token == "" {
		return nil, fmt.Errorf("this host has no certificate in %s: join the cluster with --join TOKEN --ca-hash HASH (`minicloud host join-token create` prints both)", o.Dir)
	}
	return join(ctx, o)
}

// Load reads the credentials kept in dir; an fs.ErrNotExist error means
// the host has not joined yet.
func Load(dir, hostName string) (*Credentials, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CertFile))
	if err != nil {
		return nil, fmt.Errorf("host certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, fmt.Errorf("host key: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	return parse(dir, hostName, certPEM, keyPEM, caPEM)
}

func parse(dir, hostName string, certPEM, keyPEM, caPEM []byte) (*Credentials, error) {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("host certificate in %s: %w", dir, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("host certificate in %s: %w", dir, err)
	}
	ca, err := pki.ParseCert(caPEM)
	if err != nil {
		return nil, fmt.Errorf("cluster CA in %s: %w", dir, err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, fmt.Errorf("host certificate in %s does not verify against the cluster CA (expired? then remove %s and join again with a new token): %w", dir, CertFile, err)
	}
	if leaf.Subject.CommonName != hostName {
		return nil, fmt.Errorf("%s holds the certificate of host %q, not of %q: use --host-name %s, or another data directory", dir, leaf.Subject.CommonName, hostName, leaf.Subject.CommonName)
	}
	return &Credentials{Cert: pair, CertPEM: certPEM, KeyPEM: keyPEM, CAs: pool, Leaf: leaf}, nil
}

// joinTimeout bounds one JoinHost call.
const joinTimeout = 30 * time.Second

// nameWait is how long a join waits for a live host of its name to go
// DOWN: longer than the API's host lease (15 s).
var nameWait, nameRetry = 20 * time.Second, time.Second

func join(ctx context.Context, o Options) (*Credentials, error) {
	var creds credentials.TransportCredentials
	switch {
	case o.Plaintext:
		creds = insecure.NewCredentials()
	case o.CAFile != "":
		data, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-cert: %w", err)
		}
		ca, err := pki.ParseCert(data)
		if err != nil {
			return nil, fmt.Errorf("--ca-cert %s: %w", o.CAFile, err)
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		creds = credentials.NewTLS(pki.ClientTLS(pool, nil, pki.OrgControlPlane))
	case o.CAHash != "":
		creds = credentials.NewTLS(pki.PinnedClientTLS(o.CAHash))
	default:
		return nil, errors.New("--join needs --ca-hash (printed with the token) or --ca-cert, to know the API is the real one before sending the token")
	}
	key, err := pki.NewKey()
	if err != nil {
		return nil, err
	}
	csr, err := pki.NewCSR(key, o.HostName)
	if err != nil {
		return nil, err
	}
	var resp *minicloudv1.JoinHostResponse
	deadline := time.Now().Add(nameWait)
	for {
		for _, api := range strings.Split(o.API, ",") {
			resp, err = joinOne(ctx, strings.TrimSpace(api), creds, o, csr)
			if err == nil || !errdefs.IsUnavailable(err) {
				break
			}
		}
		// ALREADY_EXISTS: a host of this name is UP. It may be this very
		// host's previous agent, stopped a moment ago with its lease
		// still running (a restart after its data directory was wiped):
		// wait the lease out before giving up. The token is not spent.
		if err == nil || !errdefs.IsAlreadyExists(err) || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(nameRetry):
		}
	}
	if err != nil {
		return nil, err
	}
	ca, err := pki.ParseCert(resp.GetCaPem())
	if err != nil {
		return nil, fmt.Errorf("CA sent by the API: %w", err)
	}
	if o.CAHash != "" && pki.Hash(ca) != o.CAHash {
		return nil, fmt.Errorf("the API sent a CA with hash %s, not the pinned %s", pki.Hash(ca), o.CAHash)
	}
	keyPEM, err := pki.EncodeKey(key)
	if err != nil {
		return nil, err
	}
	c, err := parse(o.Dir, o.HostName, resp.GetCertPem(), keyPEM, resp.GetCaPem())
	if err != nil {
		return nil, err
	}
	// The certificate is written last: its presence means the set is whole.
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("credentials directory: %w", err)
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{CAFile, resp.GetCaPem()}, {KeyFile, keyPEM}, {CertFile, resp.GetCertPem()}} {
		if err := writeFile(filepath.Join(o.Dir, f.name), f.data); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// joinOne calls JoinHost on one API replica.
func joinOne(ctx context.Context, api string, creds credentials.TransportCredentials, o Options, csr []byte) (*minicloudv1.JoinHostResponse, error) {
	conn, err := grpc.NewClient(api, append(o.DialOptions, grpc.WithTransportCredentials(creds))...)
	if err != nil {
		return nil, fmt.Errorf("API client for %s: %w", api, err)
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, joinTimeout)
	defer cancel()
	resp, err := minicloudv1.NewHostServiceClient(conn).JoinHost(cctx, &minicloudv1.JoinHostRequest{Token: o.Token, HostName: o.HostName, CsrPem: csr})
	if err != nil {
		return nil, fmt.Errorf("join the cluster at %s as host %s: %w", api, o.HostName, errdefs.FromGRPC(err))
	}
	return resp, nil
}

// writeFile writes data 0600 through a temporary file and a rename, so a
// crash leaves the old file or the new one, never half of one.
func writeFile(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
