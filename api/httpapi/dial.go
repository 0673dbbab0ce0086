package httpapi

import (
	"crypto/x509"
	"fmt"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/minicloud/minicloud/pkg/pki"
)

// DialAPI connects the gateway to the API's gRPC listener at addr (the
// address it listens on; an unspecified host, such as 0.0.0.0, is dialled
// on loopback) with TLS, trusting the cluster CA in roots and only a
// control-plane certificate. No client certificate is presented: every
// call carries the HTTP caller's own token and nothing else.
func DialAPI(addr string, roots *x509.CertPool) (*grpc.ClientConn, error) {
	target, err := LoopbackAddr(addr)
	if err != nil {
		return nil, err
	}
	creds := credentials.NewTLS(pki.ClientTLS(roots, nil, pki.OrgControlPlane))
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, fmt.Errorf("httpapi: dial API at %s: %w", addr, err)
	}
	return conn, nil
}

// LoopbackAddr is the address to dial the API listening on addr from the
// same machine: an unspecified host (0.0.0.0, [::], none) becomes
// 127.0.0.1, which the API's certificate always names.
func LoopbackAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("httpapi: API address %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}
