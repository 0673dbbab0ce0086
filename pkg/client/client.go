// Package client dials the minicloud API and bundles its service clients.
// Errors from every call (unary and streaming) come back as errdefs kinds,
// so callers use errdefs.IsNotFound and friends instead of gRPC codes.
package client

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Client holds one connection to the API server and a client per service.
type Client struct {
	Conn         *grpc.ClientConn
	VMs          minicloudv1.VMServiceClient
	Images       minicloudv1.ImageServiceClient
	Flavors      minicloudv1.FlavorServiceClient
	Networks     minicloudv1.NetworkServiceClient
	ServerGroups minicloudv1.ServerGroupServiceClient
	Hosts        minicloudv1.HostServiceClient
}

// MaxResponseBytes bounds one answer the client accepts. gRPC's default
// (4 MiB) is too small for lists: a VM may carry 512 KiB of custom metadata
// (docs/api.md), so eight such VMs would already make ListVMs unreadable.
const MaxResponseBytes = 256 << 20

// Dial prepares a connection to the API server at endpoint (host:port).
// Like grpc.NewClient it does not wait for the server: the first call fails
// with an Unavailable error if nothing answers. ctx is reserved for dial
// options that need it (TLS material); it is not retained.
func Dial(ctx context.Context, endpoint string, opts ...grpc.DialOption) (*Client, error) {
	_ = ctx
	if endpoint == "" {
		return nil, errdefs.Invalid("no API endpoint given")
	}
	base := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(errdefs.UnaryClientInterceptor),
		grpc.WithChainStreamInterceptor(StreamClientInterceptor),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxResponseBytes)),
	}
	conn, err := grpc.NewClient("passthrough:///"+endpoint, append(base, opts...)...)
	if err != nil {
		return nil, errdefs.Invalid("API endpoint %q: %v", endpoint, err)
	}
	return New(conn), nil
}

// New wraps an existing connection. Dial it with
// errdefs.UnaryClientInterceptor and StreamClientInterceptor to get error
// kinds back, as Dial does.
func New(conn *grpc.ClientConn) *Client {
	return &Client{
		Conn:         conn,
		VMs:          minicloudv1.NewVMServiceClient(conn),
		Images:       minicloudv1.NewImageServiceClient(conn),
		Flavors:      minicloudv1.NewFlavorServiceClient(conn),
		Networks:     minicloudv1.NewNetworkServiceClient(conn),
		ServerGroups: minicloudv1.NewServerGroupServiceClient(conn),
		Hosts:        minicloudv1.NewHostServiceClient(conn),
	}
}

// Close closes the connection.
func (c *Client) Close() error {
	if err := c.Conn.Close(); err != nil {
		return fmt.Errorf("close API connection: %w", err)
	}
	return nil
}

// StreamClientInterceptor maps status errors of streaming calls back to
// errdefs kinds, on opening the stream and on every send and receive.
// io.EOF passes through unchanged.
func StreamClientInterceptor(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, errdefs.FromGRPC(err)
	}
	return errStream{s}, nil
}

type errStream struct{ grpc.ClientStream }

func (s errStream) SendMsg(m any) error { return errdefs.FromGRPC(s.ClientStream.SendMsg(m)) }
func (s errStream) RecvMsg(m any) error { return errdefs.FromGRPC(s.ClientStream.RecvMsg(m)) }
func (s errStream) CloseSend() error    { return errdefs.FromGRPC(s.ClientStream.CloseSend()) }
