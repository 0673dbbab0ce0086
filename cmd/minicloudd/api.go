package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/api/httpapi"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/identity"
	"github.com/minicloud/minicloud/pkg/store"
)

const shutdownGrace = 10 * time.Second

// apiFlags configure the API role.
type apiFlags struct {
	listen        string
	metricsListen string
	// webListen is the HTTPS listener of the HTTP/JSON API, its OpenAPI
	// document and the web UI (api/httpapi); empty: off.
	webListen     string
	dataDir       string
	imageDir      string
	etcd          etcdFlags
	tlsSANs       []string
	imageMax      int64
	imageMinFree  int64
	reservedCIDRs []string
	// forwardRange is --port-forward-range (store.ParsePortRange).
	forwardRange string
	// identityIssuer and identityRotation: workload identity tokens.
	identityIssuer   string
	identityRotation time.Duration
	quota            quotaFlags
}

// quotaFlags are every project's default quota (docs/security.md,
// "Quotas"); SetQuota overrides them per project.
type quotaFlags struct {
	instances, vcpus, memoryMiB, diskGiB, networks, serverGroups, imageBytes int64
}

func (q *quotaFlags) addFlags(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.Int64Var(&q.instances, "default-quota-instances", 20, "VMs a project may have, unless set for it with minicloud quota set (-1: unlimited)")
	fl.Int64Var(&q.vcpus, "default-quota-vcpus", 40, "virtual CPUs of a project's VMs together (-1: unlimited)")
	fl.Int64Var(&q.memoryMiB, "default-quota-memory-mib", 64<<10, "memory of a project's VMs together, MiB (-1: unlimited)")
	fl.Int64Var(&q.diskGiB, "default-quota-disk-gib", 1024, "root disks of a project's VMs together, GiB (-1: unlimited)")
	fl.Int64Var(&q.networks, "default-quota-networks", 10, "networks a project may have (-1: unlimited)")
	fl.Int64Var(&q.serverGroups, "default-quota-server-groups", 10, "server groups a project may have (-1: unlimited)")
	fl.Int64Var(&q.imageBytes, "default-quota-image-bytes", 50<<30, "bytes of a project's images together (-1: unlimited)")
}

// limits is the flags as the API server's default quota.
func (q quotaFlags) limits() (*minicloudv1.QuotaLimits, error) {
	l := &minicloudv1.QuotaLimits{
		Instances: &q.instances, Vcpus: &q.vcpus, MemoryMib: &q.memoryMiB, DiskGib: &q.diskGiB,
		Networks: &q.networks, ServerGroups: &q.serverGroups, ImageBytes: &q.imageBytes,
	}
	if err := store.ValidateLimits(l); err != nil {
		return nil, fmt.Errorf("--default-quota-*: %w", err)
	}
	return l, nil
}

func (f *apiFlags) addFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.listen, "listen", "127.0.0.1:8640", "gRPC API listen address")
	cmd.Flags().StringVar(&f.webListen, "web-listen", "127.0.0.1:8644", "HTTPS listen address of the HTTP/JSON API (/v1/), its OpenAPI document (/openapi.json) and the web UI, with the API's certificate and users' tokens (empty: off)")
	cmd.Flags().StringVar(&f.metricsListen, "metrics-listen", "127.0.0.1:8641", "HTTP listen address for /metrics and /healthz (empty: off)")
	cmd.Flags().StringVar(&f.dataDir, "data-dir", "/var/lib/minicloud", "data directory (images in DIR/images, embedded etcd in DIR/etcd)")
	cmd.Flags().StringVar(&f.imageDir, "image-dir", "", "image blob store, shared by every API replica of the cluster (a network file system, or one directory on one machine) (default DIR/images)")
	cmd.Flags().Int64Var(&f.imageMax, "image-max-bytes", 0, "largest image upload, all parts together (0: 64 GiB)")
	cmd.Flags().Int64Var(&f.imageMinFree, "image-store-min-free", 0, "free space an upload must leave on the image store's file system (0: 256 MiB)")
	cmd.Flags().StringSliceVar(&f.reservedCIDRs, "reserved-cidr", nil, "a range no network may overlap, e.g. the machines' management network and the hosts' underlay (repeatable, or comma separated); hosts' registered addresses are always refused")
	cmd.Flags().StringVar(&f.forwardRange, "port-forward-range", store.DefaultPortForwardRange.String(), "host ports `minicloud vm expose` may forward, FIRST-LAST: keep it clear of ports services on the hosts listen on (minicloud's own ports are refused in any range)")
	cmd.Flags().StringSliceVar(&f.tlsSANs, "tls-san", nil, "extra names and IPs for the API's TLS certificate (served when --listen is beyond loopback), e.g. the address clients and agents dial")
	cmd.Flags().StringVar(&f.identityIssuer, "identity-issuer", "", "URL at which third parties reach this API's --metrics-listen address: the \"iss\" of guests' identity tokens, with the JWKS and OpenID discovery below it (default http://<metrics-listen address>)")
	cmd.Flags().DurationVar(&f.identityRotation, "identity-key-rotation", identity.DefaultRotation, "how long one identity token signing key signs before the next takes over (at least 3h)")
	f.etcd.addFlags(cmd.Flags())
	f.quota.addFlags(cmd)
}

func newAPICommand() *cobra.Command {
	var f apiFlags
	cmd := &cobra.Command{
		Use:   "api",
		Short: "Run the API server against an etcd cluster",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, err := f.etcd.open(cmd.Context(), f.dataDir, false)
			if err != nil {
				return err
			}
			defer conn.Close()
			return runAPI(cmd.Context(), f, conn.Client, nil)
		},
	}
	f.addFlags(cmd)
	return cmd
}

// parseReservedCIDRs parses --reserved-cidr.
func parseReservedCIDRs(in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("--reserved-cidr %q: want a CIDR such as 192.168.1.0/24: %w", s, err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// runAPI serves the API until ctx ends. ready, if set, is closed once the
// listeners are open.
func runAPI(ctx context.Context, f apiFlags, cli *clientv3.Client, ready chan<- struct{}) error {
	imageDir := f.imageDir
	if imageDir == "" {
		imageDir = filepath.Join(f.dataDir, "images")
	}
	quota, err := f.quota.limits()
	if err != nil {
		return err
	}
	reserved, err := parseReservedCIDRs(f.reservedCIDRs)
	if err != nil {
		return err
	}
	fwdRange, err := store.ParsePortRange(f.forwardRange)
	if err != nil {
		return fmt.Errorf("--port-forward-range: %w", err)
	}
	cfg := apiserver.Config{
		ReservedCIDRs:       reserved,
		PortForwardRange:    fwdRange,
		Client:              cli,
		ImageDir:            imageDir,
		Logger:              slog.Default(),
		IdentityIssuer:      f.identityIssuer,
		IdentityKeyRotation: f.identityRotation,
		DefaultQuota:        quota,
		MaxImageBytes:       f.imageMax,

		ImageStoreMinFreeBytes: f.imageMinFree,
	}
	if err := setupAPIPKI(ctx, f, cli, &cfg); err != nil {
		return err
	}
	if err := ensureAdminConfig(ctx, f, cli); err != nil {
		return err
	}
	var mlis net.Listener
	if f.metricsListen != "" {
		var err error
		if mlis, err = net.Listen("tcp", f.metricsListen); err != nil {
			return fmt.Errorf("metrics listen on %s: %w", f.metricsListen, err)
		}
		defer mlis.Close()
		if cfg.IdentityIssuer == "" {
			cfg.IdentityIssuer = "http://" + mlis.Addr().String()
		}
	}
	srv, err := apiserver.New(cfg)
	if err != nil {
		return err
	}
	// A signing key exists before the first token is asked for, so the
	// JWKS a verifier fetches first already holds it.
	if err := srv.EnsureIdentityKeys(ctx); err != nil {
		return fmt.Errorf("identity keys: %w", err)
	}
	go srv.RotateIdentityKeys(ctx)
	lis, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("API listen on %s: %w", f.listen, err)
	}
	var metrics *http.Server
	if mlis != nil {
		metrics = &http.Server{Handler: srv.MetricsHandler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			slog.Info("serving metrics", "addr", mlis.Addr().String())
			if err := metrics.Serve(mlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				slog.Error("metrics server", "err", err)
			}
		}()
	}
	errc := make(chan error, 2)
	stopWeb := func() {}
	if f.webListen != "" {
		if stopWeb, err = startWeb(ctx, f.webListen, lis.Addr().String(), cfg, errc); err != nil {
			lis.Close()
			return err
		}
	}
	if ready != nil {
		close(ready)
	}
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("API server: %w", err)
	case <-ctx.Done():
	}
	slog.Info("shutting down API server")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if metrics != nil {
		_ = metrics.Shutdown(sctx)
	}
	stopWeb()
	srv.Stop(sctx)
	return nil
}

// startWeb opens the web listener: the web console (api/webui) at / and
// the HTTP/JSON gateway to the API at apiAddr, served with the API's
// certificate. Serve errors go to errc.
// stop closes it, streams (watches, downloads) included: they do not end
// by themselves, and the API's own end with it.
func startWeb(ctx context.Context, listen, apiAddr string, cfg apiserver.Config, errc chan<- error) (stop func(), err error) {
	wlis, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("web listen on %s: %w", listen, err)
	}
	conn, err := httpapi.DialAPI(apiAddr, cfg.CA.Pool())
	if err != nil {
		wlis.Close()
		return nil, err
	}
	ui, uiAPI, err := newWebUI(apiAddr, cfg)
	if err != nil {
		wlis.Close()
		conn.Close()
		return nil, err
	}
	h, err := httpapi.NewHandler(ctx, httpapi.Config{API: conn, Mounts: map[string]http.Handler{"/": ui}})
	if err != nil {
		wlis.Close()
		conn.Close()
		uiAPI.Close()
		return nil, err
	}
	web := httpapi.NewServer(h, cfg.TLS)
	go func() {
		slog.Info("serving the web console and the HTTP/JSON API", "url", "https://"+wlis.Addr().String()+"/")
		if err := web.ServeTLS(wlis, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("web listener: %w", err)
		}
	}()
	return func() {
		_ = web.Close()
		_ = conn.Close()
		_ = uiAPI.Close()
	}, nil
}
