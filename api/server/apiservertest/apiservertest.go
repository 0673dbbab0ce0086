// Package apiservertest starts a real API server for tests and benchmarks
// of its clients: the cluster CA, a TLS serving certificate for loopback,
// the bootstrap admin, and the server on a loopback port, as `minicloudd
// api` runs.
package apiservertest

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/pki"
)

// Running is an API server on loopback.
type Running struct {
	Addr string
	CA   *pki.CA
	// TLS is the server's serving configuration (for a listener beside
	// it, such as the HTTP/JSON API's).
	TLS    *tls.Config
	Server *apiserver.Server
	// AdminToken is the bootstrap admin's bearer token.
	AdminToken string
}

// Listen starts an API server over cli on a loopback port with cfg (Client,
// CA, TLS and AgentTLS are filled in). Stop it with Server.Stop.
func Listen(ctx context.Context, cli *clientv3.Client, cfg apiserver.Config) (*Running, error) {
	ca, err := apiserver.EnsureCA(ctx, cli)
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := ca.Issue(pki.Template{CommonName: "api", Organization: pki.OrgControlPlane,
		IPs: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"}, Server: true, Lifetime: 24 * time.Hour})
	if err != nil {
		return nil, err
	}
	if cfg.TLS, err = pki.ServerTLS(certPEM, keyPEM, ca.Pool(), ""); err != nil {
		return nil, err
	}
	clientPEM, clientKey, err := ca.Issue(pki.Template{CommonName: "api", Organization: pki.OrgControlPlane, Client: true, Lifetime: 24 * time.Hour})
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(clientPEM, clientKey)
	if err != nil {
		return nil, err
	}
	cfg.Client, cfg.CA, cfg.AgentTLS = cli, ca, pki.ClientTLS(ca.Pool(), &pair, pki.OrgHosts)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	admin, err := apiserver.BootstrapAdmin(ctx, cli, 24*time.Hour)
	if err != nil {
		return nil, fmt.Errorf("bootstrap admin: %w", err)
	}
	srv, err := apiserver.New(cfg)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go srv.Serve(lis)
	return &Running{Addr: lis.Addr().String(), CA: ca, TLS: cfg.TLS, Server: srv, AdminToken: admin}, nil
}

// DialOptions are a user's: TLS trusting the CA, and token ("" for none).
func (r *Running) DialOptions(token string) []grpc.DialOption {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(r.CA.Pool(), nil, pki.OrgControlPlane)))}
	if token != "" {
		opts = append(opts, client.WithToken(token))
	}
	return opts
}

// HostDialOptions are host name's agent's: mTLS with a host certificate
// for name, straight from the CA.
func (r *Running) HostDialOptions(name string) ([]grpc.DialOption, error) {
	certPEM, keyPEM, err := r.CA.Issue(pki.Template{CommonName: name, Organization: pki.OrgHosts, Client: true, Lifetime: 24 * time.Hour})
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(r.CA.Pool(), &pair, pki.OrgControlPlane)))}, nil
}

// TLSServer is a running API server for a test.
type TLSServer struct {
	*Running
	Etcd *clientv3.Client
	// Hosts is the admin's HostService client.
	Hosts minicloudv1.HostServiceClient
}

// StartTLS starts the server; it stops when the test ends.
func StartTLS(t *testing.T) *TLSServer {
	t.Helper()
	_, cli := etcdtest.Start(t)
	r, err := Listen(context.Background(), cli, apiserver.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Server.GRPCServer().Stop() })
	conn, err := grpc.NewClient(r.Addr, r.DialOptions(r.AdminToken)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &TLSServer{Running: r, Etcd: cli, Hosts: minicloudv1.NewHostServiceClient(conn)}
}
