// Package server is the API server: it serves minicloud's gRPC API (VMs, flavors, networks,
// server groups, hosts and images) over etcd. It keeps no state of its own:
// every request reads etcd and every change is one etcd transaction, so any
// number of API servers can run against one etcd and any of them can be
// killed at any moment.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/minicloud/minicloud/api/imageservice"
	"github.com/minicloud/minicloud/api/ipam"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/api/paging"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/identity"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

// MaxRequestBytes is the largest request message the server accepts. It
// leaves room for 64 KiB of user-data and for the image upload chunks
// (1 MiB); anything larger is refused with RESOURCE_EXHAUSTED by gRPC.
const MaxRequestBytes = 4 << 20

// MaxConcurrentStreams bounds the calls and streams open at once on one
// client connection (a watch holds one for its life).
const MaxConcurrentStreams = 1000

// Host heartbeat timing, returned to agents in RegisterHostResponse.
const (
	HeartbeatInterval = 5 * time.Second
	HostLeaseTTL      = 15 * time.Second
)

// Config configures a Server.
type Config struct {
	// Client is the etcd client; the server does not close it.
	Client *clientv3.Client
	// ImageDir is where the image service keeps image blobs; every API
	// replica of a cluster must see the same directory (see
	// imageservice.Config.Dir). Empty: the image service is not served.
	ImageDir string
	// MaxImageBytes bounds one upload and ImageStoreMinFreeBytes is the
	// free space an upload must leave in ImageDir (0: the image service's
	// defaults, 64 GiB and 256 MiB).
	MaxImageBytes, ImageStoreMinFreeBytes int64
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// AgentDialOptions are added when dialing an agent's AgentService (for
	// GetConsoleLog). Default: plaintext.
	AgentDialOptions []grpc.DialOption
	// VNIRange bounds the VXLAN segment ids given to networks; zero means
	// store.DefaultVNIRange.
	VNIRange store.VNIRange
	// PortForwardRange bounds the host ports of port forwards; zero means
	// store.DefaultPortForwardRange.
	PortForwardRange store.PortRange
	// ReservedCIDRs are ranges no network may overlap: the operator's
	// management and underlay networks (minicloudd api --reserved-cidr).
	ReservedCIDRs []netip.Prefix

	// CA is the cluster CA (EnsureCA): it signs the certificates of
	// joining hosts. Nil: JoinHost and CreateJoinToken are refused.
	CA *pki.CA
	// TLS is required: the server speaks TLS only (pki.ServerTLS, client
	// certificates verified if given), on loopback too, since hosts prove
	// who they are with client certificates and users' tokens must not
	// travel in the clear.
	TLS *tls.Config
	// DefaultQuota is every project's quota where it has no override
	// (SetQuota); an unset field, or nil, is unlimited. minicloudd sets it
	// from its --default-quota-* flags.
	DefaultQuota *minicloudv1.QuotaLimits

	// AgentTLS, if set, is the client configuration (the control-plane
	// certificate and the CA) for calling agents that listen beyond
	// loopback: they serve mTLS only.
	AgentTLS *tls.Config

	// IdentityIssuer is the "iss" of workload identity tokens: the URL
	// third parties reach the HTTP listener (MetricsHandler) at, which
	// serves the OpenID discovery document and the JWKS below it.
	// Default DefaultIdentityIssuer (no discovery possible).
	IdentityIssuer string
	// IdentityKeyRotation is how long one identity key signs (default
	// identity.DefaultRotation, at least identity.MinRotation).
	IdentityKeyRotation time.Duration
	// Now is the clock of the identity key schedule and of token times
	// (tests move it across a rotation). Default time.Now.
	Now func() time.Time
}

// Server is the API server: a gRPC server with every minicloud service,
// health and reflection, and an HTTP handler for /metrics and /healthz.
type Server struct {
	etcd     *clientv3.Client
	log      *slog.Logger
	ipam     *ipam.Allocator
	leases   *requestLeases
	grpc     *grpc.Server
	health   *health.Server
	registry *prometheus.Registry
	agentOpt []grpc.DialOption
	images   *imageservice.Service // nil if not served
	vnis     store.VNIRange
	fwdPorts store.PortRange
	reserved []netip.Prefix // Config.ReservedCIDRs

	idIssuer   string
	idRotation time.Duration
	idKeys     identityKeys
	now        func() time.Time

	// audit appends the audit log (audit.go).
	audit *store.AuditLog
	// quotaDefaults are the limits of a project without overrides.
	quotaDefaults *minicloudv1.QuotaLimits
	// creates group-commits each project's VM creates (createbatch.go).
	creates *createBatcher

	ca       *pki.CA
	agentTLS *tls.Config
	// pages signs and checks the page tokens of every List RPC.
	pages *paging.Tokens
	// vmCache is the VMs every watch stream shares (watch.go).
	vmCache *vmCache
	// creds is the tokens, users and revoked certificates every call is
	// authenticated against (credcache.go).
	creds *credCache
	// createCache is the images, flavors and networks a create refers to,
	// and the allocated addresses (createcache.go).
	createCache *createCache

	// knownNetworks caches network key → the *Network a create last read,
	// so the next create can pick candidate addresses before its read and
	// probe them in the same round trip as the network (readCreateRefs).
	knownNetworks sync.Map

	// streams ends every watch stream when the server stops, so that
	// GracefulStop does not wait for streams that never end by themselves.
	streams     context.Context
	stopStreams context.CancelFunc
}

// New builds a Server; call Serve to accept connections.
func New(cfg Config) (*Server, error) {
	if cfg.Client == nil {
		return nil, errors.New("apiserver: Config.Client is required")
	}
	if cfg.TLS == nil {
		return nil, errors.New("apiserver: Config.TLS is required: the API serves TLS only")
	}
	if cfg.IdentityIssuer == "" {
		cfg.IdentityIssuer = DefaultIdentityIssuer
	}
	if cfg.IdentityKeyRotation == 0 {
		cfg.IdentityKeyRotation = identity.DefaultRotation
	}
	if cfg.IdentityKeyRotation < identity.MinRotation {
		return nil, fmt.Errorf("apiserver: identity key rotation %s is shorter than the minimum %s", cfg.IdentityKeyRotation, identity.MinRotation)
	}
	s := &Server{
		etcd:     cfg.Client,
		vnis:     cfg.VNIRange,
		fwdPorts: cfg.PortForwardRange,
		reserved: cfg.ReservedCIDRs,
		log:      cfg.Logger,
		ipam:     ipam.New(cfg.Client),
		leases:   &requestLeases{lease: cfg.Client},
		health:   health.NewServer(),
		registry: prometheus.NewRegistry(),
		agentOpt: cfg.AgentDialOptions,
		ca:       cfg.CA,
		agentTLS: cfg.AgentTLS,

		idIssuer:      strings.TrimSuffix(cfg.IdentityIssuer, "/"),
		idRotation:    cfg.IdentityKeyRotation,
		idKeys:        identityKeys{parsed: map[string]identity.Key{}},
		now:           cfg.Now,
		quotaDefaults: cfg.DefaultQuota,
	}
	s.creates = newCreateBatcher(s)
	s.vmCache = &vmCache{s: s}
	s.creds = newCredCache(s)
	s.createCache = newCreateCache(s)
	// Page tokens are signed with a key every replica derives from the
	// cluster CA's, so a page from one replica continues on another.
	var pageSecret []byte
	if cfg.CA != nil {
		if key, err := cfg.CA.KeyPEM(); err == nil {
			pageSecret = key
		}
	}
	s.pages = paging.NewTokens(pageSecret)
	s.audit = store.NewAuditLog(cfg.Client)
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.now == nil {
		s.now = time.Now
	}
	s.streams, s.stopStreams = context.WithCancel(context.Background())
	s.log = s.log.With("component", "apiserver")
	m := newMetrics(s.registry)
	s.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxRequestBytes),
		// Connection limits, set rather than left to gRPC's defaults
		// (docs/operations.md "API limits"): streams per connection, how
		// often a client may ping, and when a silent peer is dropped.
		grpc.MaxConcurrentStreams(MaxConcurrentStreams),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: 15 * time.Minute,
			Time:              30 * time.Second,
			Timeout:           10 * time.Second,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Calls run on a pool of goroutines that live on, instead of a new
		// goroutine per call: a create's stack grows to tens of KB, and
		// growing (copying) a fresh 8 KB stack on every call was ~3 % of
		// the API's CPU in the create profile (docs/benchmarks.md, "API").
		// gRPC starts a goroutine as before when every worker is busy.
		grpc.NumStreamWorkers(uint32(2 * runtime.GOMAXPROCS(0))),
		grpc.ChainUnaryInterceptor(m.unary, s.logUnary, errdefs.UnaryServerInterceptor, s.auditUnary, s.authUnary, refuseUnknownFieldsUnary),
		grpc.ChainStreamInterceptor(m.stream, s.logStream, errdefs.StreamServerInterceptor, s.auditStream, s.authStream, s.revokedStream, refuseUnknownFieldsStream),
		// proto, except that image downloads go out without a copy.
		grpc.ForceServerCodecV2(imageservice.ServerCodec()),
	}
	opts = append(opts, grpc.Creds(credentials.NewTLS(cfg.TLS)))
	s.grpc = grpc.NewServer(opts...)
	minicloudv1.RegisterVMServiceServer(s.grpc, &vmService{s: s})
	minicloudv1.RegisterFlavorServiceServer(s.grpc, &flavorService{s: s})
	minicloudv1.RegisterNetworkServiceServer(s.grpc, &networkService{s: s})
	minicloudv1.RegisterServerGroupServiceServer(s.grpc, &serverGroupService{s: s})
	minicloudv1.RegisterHostServiceServer(s.grpc, &hostService{s: s})
	minicloudv1.RegisterAuthServiceServer(s.grpc, &authService{s: s})
	minicloudv1.RegisterAuditServiceServer(s.grpc, &auditService{s: s})
	minicloudv1.RegisterIdentityServiceServer(s.grpc, &identityService{s: s})
	minicloudv1.RegisterQuotaServiceServer(s.grpc, &quotaService{s: s})
	services := []string{
		minicloudv1.AuthService_ServiceDesc.ServiceName,
		minicloudv1.AuditService_ServiceDesc.ServiceName,
		minicloudv1.VMService_ServiceDesc.ServiceName,
		minicloudv1.FlavorService_ServiceDesc.ServiceName,
		minicloudv1.NetworkService_ServiceDesc.ServiceName,
		minicloudv1.ServerGroupService_ServiceDesc.ServiceName,
		minicloudv1.HostService_ServiceDesc.ServiceName,
		minicloudv1.IdentityService_ServiceDesc.ServiceName,
		minicloudv1.QuotaService_ServiceDesc.ServiceName,
	}
	if cfg.ImageDir != "" {
		s.images = imageservice.New(imageservice.Config{
			Client: cfg.Client,
			Dir:    cfg.ImageDir,
			InUse:  s.ImageInUse,

			DefaultQuota:  cfg.DefaultQuota,
			ProjectOf:     projectOf,
			MaxImageBytes: cfg.MaxImageBytes,
			MinFreeBytes:  cfg.ImageStoreMinFreeBytes,
			PageTokens:    s.pages,
		})
		minicloudv1.RegisterImageServiceServer(s.grpc, s.images)
		images := s.images
		s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "minicloud_image_checks_pending",
			Help: "Blobs of new images waiting for this replica's background check (sha256 of the stored file, so that a host's first fetch is served without it) or being checked.",
		}, func() float64 { return float64(images.PendingChecks()) }))
		services = append(services, minicloudv1.ImageService_ServiceDesc.ServiceName)
	}
	healthpb.RegisterHealthServer(s.grpc, s.health)
	for _, name := range append(services, "") {
		s.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	reflection.Register(s.grpc)
	return s, nil
}

// GRPCServer returns the underlying gRPC server (to register more services
// before Serve).
func (s *Server) GRPCServer() *grpc.Server { return s.grpc }

// Serve accepts gRPC connections on lis until Stop.
func (s *Server) Serve(lis net.Listener) error {
	s.log.Info("serving gRPC API", "addr", lis.Addr().String())
	l := newTLSOnlyListener(lis)
	defer l.stop()
	return s.grpc.Serve(l.tls)
}

// Stop marks the server NOT_SERVING, ends watch streams (clients resume
// elsewhere from their last resource version), lets unary calls finish
// until ctx ends, then closes every connection.
func (s *Server) Stop(ctx context.Context) {
	s.health.Shutdown()
	s.stopStreams()
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.grpc.Stop()
		<-done
	}
	if s.images != nil {
		s.images.Close()
	}
}

// MetricsHandler serves /metrics (Prometheus), /healthz (200 when etcd
// answers, 503 otherwise), and, to anyone, the workload identity keys
// (/.well-known/jwks.json) and OpenID discovery document.
func (s *Server) MetricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(identity.JWKSPath, s.serveJWKS)
	mux.HandleFunc(identity.DiscoveryPath, s.serveDiscovery)
	mux.Handle("/metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if _, err := s.etcd.Get(ctx, "health", clientv3.WithCountOnly()); err != nil {
			http.Error(w, "etcd: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}
