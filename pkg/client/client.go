// Package client dials the minicloud API and bundles its service clients.
// Errors from every call (unary and streaming) come back as errdefs kinds,
// so callers use errdefs.IsNotFound and friends instead of gRPC codes.
//
// A client may be given several API replicas ("a:8640,b:8640"). Failover is
// gRPC's own: a static (manual) resolver hands all addresses to the
// round_robin balancer, client-side health checking (grpc.health.v1) keeps
// calls off a replica that is down or draining, and the service config
// retries idempotent calls that failed with UNAVAILABLE on another replica.
// Long-lived streams (WatchVMs, WatchAssignments) end with UNAVAILABLE when
// their replica dies; their callers re-open them (on a live replica, since
// the balancer no longer picks the dead one) and resume from their level
// (the full set plus a BOOKMARK, or a resource version).
package client

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/health" // client-side health checking
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

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
	Auth         minicloudv1.AuthServiceClient
	Identity     minicloudv1.IdentityServiceClient
	Quotas       minicloudv1.QuotaServiceClient
}

// MaxResponseBytes bounds one answer the client accepts, set deliberately
// (docs/operations.md "API limits"). gRPC's default (4 MiB) is too small
// for a page: a VM may carry up to 1 MiB of spec (512 KiB of custom
// metadata, keys, labels), and the server ends a ListVMs page once it
// holds 64 MiB, after a chunk of at most 64 VMs, so a page is at most
// 128 MiB. Anything larger than that is not an answer this client wants.
const MaxResponseBytes = 256 << 20

// Dial prepares a connection to the API at endpoints: one host:port or
// several separated by commas (replicas of one control plane). Like
// grpc.NewClient it does not wait for the server: the first call fails
// with an Unavailable error if no replica answers. ctx is reserved for dial
// options that need it (TLS material); it is not retained.
func Dial(ctx context.Context, endpoints string, opts ...grpc.DialOption) (*Client, error) {
	_ = ctx
	conn, err := NewConn(endpoints, opts...)
	if err != nil {
		return nil, err
	}
	return New(conn), nil
}

// NewConn returns a connection to the API replicas in endpoints (see Dial)
// with failover, retries of idempotent calls, and errdefs error kinds on
// unary and streaming calls. Transport credentials default to plaintext;
// a grpc.WithTransportCredentials in opts replaces that.
func NewConn(endpoints string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	addrs, err := ParseEndpoints(endpoints)
	if err != nil {
		return nil, err
	}
	eps := make([]resolver.Endpoint, len(addrs))
	for i, a := range addrs {
		// ServerName: each replica is verified (TLS) and addressed
		// (:authority) by its own name, not by the resolver's target.
		eps[i] = resolver.Endpoint{Addresses: []resolver.Address{{Addr: a, ServerName: a}}}
	}
	r := manual.NewBuilderWithScheme("minicloud-api")
	r.InitialState(resolver.State{Endpoints: eps})
	base := []grpc.DialOption{
		grpc.WithResolvers(r),
		grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(errdefs.UnaryClientInterceptor),
		grpc.WithChainStreamInterceptor(StreamClientInterceptor),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxResponseBytes)),
	}
	conn, err := grpc.NewClient(r.Scheme()+":///"+addrs[0], append(base, opts...)...)
	if err != nil {
		return nil, errdefs.Invalid("API endpoints %q: %v", endpoints, err)
	}
	return conn, nil
}

// ParseEndpoints splits a comma-separated list of API addresses, checks
// that each is host:port, and drops duplicates (order is kept).
func ParseEndpoints(s string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, e := range strings.Split(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		host, port, err := net.SplitHostPort(e)
		if err != nil || host == "" || port == "" {
			return nil, errdefs.Invalid("API endpoint %q must be host:port", e)
		}
		if !seen[e] {
			seen[e] = true
			out = append(out, e)
		}
	}
	if len(out) == 0 {
		return nil, errdefs.Invalid("no API endpoint given")
	}
	return out, nil
}

// idempotentMethods are retried on another replica when they fail with
// UNAVAILABLE: repeating them cannot do anything twice. Creates are left
// out (CreateVM is made idempotent by its request_id, which its callers
// retry with), as are deletes (a retry after a lost reply would report
// NotFound for a delete that happened) and RebootVM (each call is one
// more reboot). Streams are retried only until their first message.
var idempotentMethods = map[string][]string{
	"minicloud.v1.VMService":          {"GetVM", "ListVMs", "StartVM", "StopVM", "WatchVMs", "GetConsoleLog", "ListVMEvents", "ExposeVMPort", "UnexposeVMPort"},
	"minicloud.v1.ImageService":       {"GetImage", "ListImages", "DownloadImage"},
	"minicloud.v1.FlavorService":      {"GetFlavor", "ListFlavors"},
	"minicloud.v1.NetworkService":     {"GetNetwork", "ListNetworks"},
	"minicloud.v1.ServerGroupService": {"GetServerGroup", "ListServerGroups"},
	"minicloud.v1.AuthService":        {"GetProject", "ListProjects", "GetUser", "ListUsers", "ListTokens", "WhoAmI"},
	"minicloud.v1.HostService":        {"Heartbeat", "WatchAssignments", "ReportVMStatus", "ListHosts", "GetHost", "DisableHost", "EnableHost", "IssueIdentityToken"},
	"minicloud.v1.IdentityService":    {"GetJWKS"},
}

// serviceConfig is the client's gRPC service config (see
// https://github.com/grpc/grpc/blob/master/doc/service_config.md).
var serviceConfig = func() string {
	type name struct {
		Service string `json:"service"`
		Method  string `json:"method"`
	}
	var names []name
	for svc, methods := range idempotentMethods {
		for _, m := range methods {
			names = append(names, name{svc, m})
		}
	}
	cfg := map[string]any{
		// round_robin keeps a connection to every replica, so a call
		// after a replica dies goes to one that is already connected.
		"loadBalancingConfig": []any{map[string]any{"round_robin": map[string]any{}}},
		// The API serves grpc.health.v1 and reports NOT_SERVING while it
		// drains; the balancer then stops picking it.
		"healthCheckConfig": map[string]any{"serviceName": ""},
		"methodConfig": []any{map[string]any{
			"name": names,
			"retryPolicy": map[string]any{
				"maxAttempts":          5,
				"initialBackoff":       "0.1s",
				"maxBackoff":           "2s",
				"backoffMultiplier":    2,
				"retryableStatusCodes": []string{"UNAVAILABLE"},
			},
		}},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		panic(fmt.Sprintf("client service config: %v", err))
	}
	return string(b)
}()

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
		Auth:         minicloudv1.NewAuthServiceClient(conn),
		Identity:     minicloudv1.NewIdentityServiceClient(conn),
		Quotas:       minicloudv1.NewQuotaServiceClient(conn),
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
