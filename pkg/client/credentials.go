package client

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/minicloud/minicloud/pkg/pki"
)

// bearer sends a user's token with every call, as the standard gRPC
// metadata `authorization: Bearer <token>`.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity: a token is never sent in the clear.
func (bearer) RequireTransportSecurity() bool { return true }

// WithToken makes every call carry token (over TLS only: gRPC refuses to
// send it on a plaintext connection).
func WithToken(token string) grpc.DialOption {
	return grpc.WithPerRPCCredentials(bearer(token))
}

// UserDialOptions are a user's dial options: TLS trusting only the cluster
// CA in caFile (a control-plane certificate signed by it), and token.
func UserDialOptions(caFile, token string) ([]grpc.DialOption, error) {
	cfg, err := pki.ClientTLSFromFile(caFile)
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}
	if token != "" {
		opts = append(opts, WithToken(token))
	}
	return opts, nil
}
