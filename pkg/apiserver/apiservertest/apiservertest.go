// Package apiservertest starts a real API server for tests of its clients:
// an embedded etcd, the cluster CA, and the server on a loopback port
// serving TLS as `minicloudd api` does beyond loopback.
package apiservertest

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/apiserver"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/pki"
)

// TLSServer is a running API server on TLS.
type TLSServer struct {
	Addr string
	CA   *pki.CA
	Etcd *clientv3.Client
	// Hosts is an operator's client (TLS, no client certificate).
	Hosts minicloudv1.HostServiceClient
}

// StartTLS starts the server; it stops when the test ends.
func StartTLS(t *testing.T) *TLSServer {
	t.Helper()
	_, cli := etcdtest.Start(t)
	ca, err := apiserver.EnsureCA(context.Background(), cli)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue(pki.Template{CommonName: "api", Organization: pki.OrgControlPlane,
		IPs: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"}, Server: true, Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := pki.ServerTLS(certPEM, keyPEM, ca.Pool(), "")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := apiserver.New(apiserver.Config{Client: cli, Logger: slog.New(slog.DiscardHandler), CA: ca, TLS: tlsCfg})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.GRPCServer().Stop() })
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(ca.Pool(), nil, pki.OrgControlPlane))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &TLSServer{Addr: lis.Addr().String(), CA: ca, Etcd: cli, Hosts: minicloudv1.NewHostServiceClient(conn)}
}
