package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/minicloud/minicloud/agent"
	"github.com/minicloud/minicloud/agent/disk"
	"github.com/minicloud/minicloud/agent/guestservices"
	"github.com/minicloud/minicloud/agent/guestservices/dhcpserver"
	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	"github.com/minicloud/minicloud/agent/hypervisor/libvirt"
	"github.com/minicloud/minicloud/agent/imagecache"
	"github.com/minicloud/minicloud/agent/join"
	netlinux "github.com/minicloud/minicloud/agent/network/linux"
	"github.com/minicloud/minicloud/agent/qemuaccess"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/metadata"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/pki"
)

// agentFlags configure the agent role (and the metadata service it runs).
type agentFlags struct {
	api           string
	listen        string
	advertise     string
	metricsListen string
	dataDir       string
	hostName      string
	zone          string
	cpuRatio      float64
	ramRatio      float64
	diskRatio     float64
	disableKVM    bool
	identityKey   string
	libvirtSocket string
	// Capacity overrides (0: measured).
	vcpus     int
	memoryMiB int64
	diskGiB   int64
	// protectedNets are the management networks guests may not reach.
	protectedNets []string
	tunnelIP      string
	fenceAfter    time.Duration
	join          string
	caHash        string
	caCert        string
	// metadataFrontEnd names the metadata service's front end
	// (metadata.ParseFrontEnd; empty: its default).
	metadataFrontEnd string

	// selfJoin, set by the all-in-one, makes a join token in-process when
	// its agent has no certificate yet.
	selfJoin func(ctx context.Context) (token, caHash string, err error)
}

func (f *agentFlags) addFlags(cmd *cobra.Command, standalone bool) {
	fl := cmd.Flags()
	if standalone {
		fl.StringVar(&f.api, "api", "127.0.0.1:8640", "API server address host:port, or the addresses of several API replicas separated by commas")
		fl.StringVar(&f.dataDir, "data-dir", "/var/lib/minicloud", "data directory (the agent uses DIR/agent)")
		fl.StringVar(&f.join, "join", "", "one-time join token (`minicloud host join-token create`): used once to get this host's certificate, kept in DIR/agent/pki; later starts need no token")
		fl.StringVar(&f.caHash, "ca-hash", "", "pin of the cluster CA for joining (sha256:..., printed with the join token)")
		fl.StringVar(&f.caCert, "ca-cert", "", "cluster CA certificate file, instead of --ca-hash")
	}
	// The all-in-one's agent is reached only by its own API, so it takes
	// any free loopback port and keeps its metrics off unless asked: two
	// clouds (a lab and a test run) can then share one machine.
	listen, metrics := "127.0.0.1:0", ""
	if standalone {
		listen, metrics = "0.0.0.0:8642", "0.0.0.0:8643"
	}
	fl.StringVar(&f.listen, "agent-listen", listen, "agent gRPC listen address (console logs for the API)")
	fl.StringVar(&f.advertise, "agent-advertise", "", "address the API uses to reach this agent (default: the address --agent-listen resolves to)")
	fl.StringVar(&f.metricsListen, "agent-metrics-listen", metrics, "agent HTTP listen address for /metrics and /healthz (empty: off)")
	fl.StringVar(&f.hostName, "host-name", "", "this hypervisor's name (default: the machine's host name)")
	fl.StringVar(&f.zone, "availability-zone", "", "availability zone of this host")
	fl.Float64Var(&f.cpuRatio, "cpu-allocation-ratio", 0, "vCPU overcommit ratio (0: the scheduler default, 4.0)")
	fl.Float64Var(&f.ramRatio, "ram-allocation-ratio", 0, "memory overcommit ratio (0: the scheduler default, 1.0)")
	fl.Float64Var(&f.diskRatio, "disk-allocation-ratio", 0, "disk overcommit ratio (0: the scheduler default, 1.0)")
	fl.BoolVar(&f.disableKVM, "disable-kvm", false, "never use KVM, only TCG")
	fl.StringVar(&f.tunnelIP, "tunnel-ip", "", "this host's underlay address for VXLAN: networks span every host that has one (default: none, networks stay on this host)")
	fl.StringVar(&f.identityKey, "identity-key", "", "PEM Ed25519 key that signs instance identity documents (default: DIR/agent/identity.pem, created if missing)")
	fl.StringVar(&f.libvirtSocket, "libvirt-socket", libvirt.DefaultSocket, "libvirtd's read-write unix socket (qemu:///system)")
	fl.IntVar(&f.vcpus, "vcpus", 0, "vCPUs this host offers to the scheduler (0: all the machine's)")
	fl.Int64Var(&f.memoryMiB, "memory", 0, "memory in MiB this host offers to the scheduler (0: all the machine's)")
	fl.Int64Var(&f.diskGiB, "disk", 0, "disk in GiB this host offers to the scheduler (0: the size of the file system of the data directory)")
	fl.DurationVar(&f.fenceAfter, "fence-after", 0, "self-fencing: after this long without renewing the host's lease (shorter than the 15s lease), destroy every domain and start none until the API confirms which VMs are still this host's; the control plane then counts the host FENCED and may evacuate its VMs (0: never; only an operator can fence the host)")
	fl.StringVar(&f.metadataFrontEnd, "metadata-front-end", "default", "how the metadata service serves guests' connections: eventloop (the default: a few event loops read, parse and answer) or goroutines (fasthttp, a goroutine per connection)")
	fl.StringSliceVar(&f.protectedNets, "protected-nets", nil, "management networks (CIDRs, comma separated) guests may not reach through this host: where the API, etcd and other hosts' agents and libvirt listen (the host's own ports are always closed to guests)")
}

// protectedPrefixes parses --protected-nets.
func (f *agentFlags) protectedPrefixes() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range f.protectedNets {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("--protected-nets %q: want a CIDR such as 10.0.0.0/24: %w", s, err)
		}
		if !p.Addr().Is4() {
			return nil, fmt.Errorf("--protected-nets %q: only IPv4 networks (guests have no IPv6)", s)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

var allInOneAgentFlags agentFlags

func init() {
	extraCommands = append(extraCommands, newAgentCommand)
	allInOneRoles = append(allInOneRoles, namedRole{"agent", func(ctx context.Context, env roleEnv) error {
		f := allInOneAgentFlags
		f.api, f.dataDir = localAddr(env.APIAddr), env.DataDir
		f.selfJoin = func(ctx context.Context) (string, string, error) {
			ca, err := apiserver.EnsureCA(ctx, env.Etcd)
			if err != nil {
				return "", "", err
			}
			token, _, err := apiserver.CreateJoinToken(ctx, env.Etcd, 10*time.Minute, "all-in-one agent")
			return token, ca.Hash(), err
		}
		return runAgent(ctx, f)
	}})
	allInOneFlagHooks = append(allInOneFlagHooks, func(cmd *cobra.Command) { allInOneAgentFlags.addFlags(cmd, false) })
}

func newAgentCommand() *cobra.Command {
	var f agentFlags
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the hypervisor agent and metadata service on this host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAgent(cmd.Context(), f)
		},
	}
	f.addFlags(cmd, true)
	return cmd
}

func runAgent(ctx context.Context, f agentFlags) error {
	log := slog.Default()
	protected, err := f.protectedPrefixes()
	if err != nil {
		return err
	}
	if f.vcpus < 0 || f.memoryMiB < 0 || f.diskGiB < 0 {
		return fmt.Errorf("--vcpus, --memory and --disk must not be negative (0: measured)")
	}
	stateDir := filepath.Join(f.dataDir, "agent")
	// QEMU runs as an unprivileged user: it must be able to traverse down
	// to the disks (the files themselves are handed over by libvirt), and
	// no other local user may.
	qemu, err := qemuaccess.Detect(qemuaccess.ConfPath)
	if err != nil {
		log.Warn("cannot tell QEMU's group: the data directory stays traversable and cached images readable by every local user", "err", err)
		qemu = qemuaccess.World()
	}
	for _, d := range []string{f.dataDir, stateDir} {
		if err := qemu.MkdirAll(d); err != nil {
			return fmt.Errorf("agent state directory: %w", err)
		}
	}
	if p := untraversableParent(f.dataDir); p != "" {
		log.Warn("QEMU's unprivileged user cannot reach VM disks under this data directory; VMs will fail to start. Use a data directory whose parents are world-traversable (e.g. under /var/lib)", "dir", p)
	}
	var tunnelIP netip.Addr
	var underlayMTU int
	if f.tunnelIP != "" {
		var err error
		if tunnelIP, err = netip.ParseAddr(f.tunnelIP); err != nil || !tunnelIP.Is4() {
			return fmt.Errorf("--tunnel-ip %q: want this host's IPv4 underlay address", f.tunnelIP)
		}
		if underlayMTU, err = netlinux.UnderlayMTU(tunnelIP); err != nil {
			return fmt.Errorf("--tunnel-ip: %w", err)
		}
		log.Info("networks span hosts over VXLAN", "tunnel_ip", tunnelIP, "underlay_mtu", underlayMTU)
	}
	key, err := loadOrCreateIdentityKey(f.identityKey, filepath.Join(stateDir, "identity.pem"))
	if err != nil {
		return err
	}

	if f.hostName == "" {
		if f.hostName, err = os.Hostname(); err != nil {
			return fmt.Errorf("host name: %w", err)
		}
	}
	creds, err := hostCredentials(ctx, f, stateDir)
	if err != nil {
		return err
	}
	apiCreds := credentials.NewTLS(creds.ClientTLS())
	// Several API replicas fail over (see package client): the
	// assignment stream then re-opens on a live replica and starts again
	// from the full set. The image cache downloads over it too (its
	// options spare a copy and a clear of every byte received).
	conn, err := client.NewConn(f.api, append([]grpc.DialOption{grpc.WithTransportCredentials(apiCreds)}, imagecache.DialOptions()...)...)
	if err != nil {
		return fmt.Errorf("API client for %s: %w", f.api, err)
	}
	defer conn.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	hv := libvirt.New(libvirt.Options{Socket: f.libvirtSocket, DisableKVM: f.disableKVM, Logger: log})
	defer hv.Close()
	dir := metadata.NewDirectory()
	front, err := metadata.ParseFrontEnd(f.metadataFrontEnd)
	if err != nil {
		return fmt.Errorf("--metadata-front-end: %w", err)
	}
	// The metadata service tells the agent when a guest first reads its
	// metadata (GuestReady); a is set before anything is served.
	var a *agent.Agent
	md, err := metadata.NewServer(dir, metadata.Options{
		Logger: log, IdentityKey: key, Registerer: reg, FrontEnd: front,
		// Identity tokens are signed by the API, which keeps the keys.
		Identity:       metadata.HostServiceIdentity{Client: minicloudv1.NewHostServiceClient(conn), Host: f.hostName},
		OnFirstRequest: func(vmID string) { a.GuestActive(vmID) },
	})
	if err != nil {
		return fmt.Errorf("metadata service: %w", err)
	}
	guests := guestservices.New(dir, md, dhcpserver.New(dhcpserver.WithLogger(log)), dnsserver.New(dnsserver.WithLogger(log)))
	cache, err := imagecache.New(filepath.Join(stateDir, "images"), minicloudv1.NewImageServiceClient(conn), qemu)
	if err != nil {
		return fmt.Errorf("image cache: %w", err)
	}

	lis, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("agent listen on %s: %w", f.listen, err)
	}
	if f.advertise == "" {
		// The resolved address, so "--agent-listen 127.0.0.1:0" works.
		f.advertise = lis.Addr().String()
	}
	a, err = agent.New(agent.Config{
		HostName:         f.hostName,
		AdvertiseAddr:    f.advertise,
		StateDir:         stateDir,
		AvailabilityZone: f.zone,
		AllocationRatios: &minicloudv1.AllocationRatios{Cpu: f.cpuRatio, Ram: f.ramRatio, Disk: f.diskRatio},
		Version:          version,
		Capacity:         agent.CapacityOverride{VCPUs: f.vcpus, MemoryMiB: f.memoryMiB, DiskGiB: f.diskGiB},
		TunnelIP:         tunnelIP,
		UnderlayMTU:      underlayMTU,
		QEMU:             qemu,
		FenceAfter:       f.fenceAfter,
	}, agent.Deps{
		API:        conn,
		Hypervisor: hv,
		Network:    netlinux.New(netlinux.WithLogger(log), netlinux.WithProtectedNets(protected...)),
		Disks:      qemuImgDisks{},
		Images:     cache,
		Guest:      guests,
	}, agent.WithLogger(log))
	if err != nil {
		lis.Close()
		return err
	}

	reg.MustRegister(a.Collector())

	srvOpts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(errdefs.UnaryServerInterceptor), grpc.ChainStreamInterceptor(errdefs.StreamServerInterceptor),
		// A console session relayed by an API server that vanished (its
		// host died) is dropped within 40 s, freeing its slot and the
		// write side, as the API does for its own clients.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	}
	if creds != nil {
		tlsCfg, err := creds.ServerTLS()
		if err != nil {
			lis.Close()
			return err
		}
		srvOpts = append(srvOpts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	gs := grpc.NewServer(srvOpts...)
	minicloudv1.RegisterAgentServiceServer(gs, a.Service())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.Run(gctx) })
	g.Go(func() error { return guests.Run(gctx) })
	g.Go(func() error {
		if err := gs.Serve(lis); err != nil && gctx.Err() == nil {
			return fmt.Errorf("agent gRPC server: %w", err)
		}
		return nil
	})
	if f.metricsListen != "" {
		g.Go(func() error { return serveMetrics(gctx, f.metricsListen, reg) })
	}
	g.Go(func() error {
		<-gctx.Done()
		gs.GracefulStop()
		return nil
	})
	log.Info("agent running", "listen", f.listen, "api", f.api, "state", stateDir)
	return g.Wait()
}

// untraversableParent returns the first directory above dir that others
// cannot traverse (mode without o+x), or "".
func untraversableParent(dir string) string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return ""
	}
	for p := filepath.Dir(abs); ; p = filepath.Dir(p) {
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o001 == 0 {
			return p
		}
		if p == "/" {
			return ""
		}
	}
}

// qemuImgDisks adapts agent/disk's functions to the agent's Disks port.
type qemuImgDisks struct{}

func (qemuImgDisks) CreateOverlay(ctx context.Context, path, backing, format string, size int64) error {
	return disk.CreateOverlay(ctx, path, backing, format, size)
}

func (qemuImgDisks) ForgetUnder(dir string) { disk.ForgetUnder(dir) }

// serveMetrics serves /metrics and /healthz until ctx ends.
func serveMetrics(ctx context.Context, addr string, reg *prometheus.Registry) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listen on %s: %w", addr, err)
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics server: %w", err)
	}
	return nil
}

// loadOrCreateIdentityKey reads the key that signs instance identity
// documents, creating one at def when no path is configured. Every host of
// a cloud should be given the same key (--identity-key) so guests can
// verify documents against one public key.
func loadOrCreateIdentityKey(path, def string) (ed25519.PrivateKey, error) {
	create := false
	if path == "" {
		path = def
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			create = true
		}
	}
	if create {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate identity key: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return nil, fmt.Errorf("encode identity key: %w", err)
		}
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, fmt.Errorf("write identity key: %w", err)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read identity key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("identity key %s: no PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("identity key %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("identity key %s: want an Ed25519 key, got %T", path, k)
	}
	return priv, nil
}

// hostCredentials returns this host's certificate, joining the cluster
// with --join if the data directory holds none yet. Every agent proves its
// name with it, the all-in-one's too (it joins itself), since the API
// serves no call without credentials (docs/security.md).
func hostCredentials(ctx context.Context, f agentFlags, stateDir string) (*join.Credentials, error) {
	dir := filepath.Join(stateDir, "pki")
	if f.selfJoin != nil && f.join == "" {
		if _, err := join.Load(dir, f.hostName); errors.Is(err, os.ErrNotExist) {
			if f.join, f.caHash, err = f.selfJoin(ctx); err != nil {
				return nil, fmt.Errorf("join the all-in-one's own agent: %w", err)
			}
		}
	}
	creds, err := join.Ensure(ctx, join.Options{
		Dir: dir, HostName: f.hostName, API: f.api,
		Token: f.join, CAHash: f.caHash, CAFile: f.caCert,
	})
	if err != nil {
		return nil, err
	}
	slog.Info("host certificate", "host", f.hostName, "serial", pki.SerialString(creds.Leaf), "expires", creds.Leaf.NotAfter)
	return creds, nil
}

// localAddr turns a listen address into one this machine can dial: an
// unspecified host (0.0.0.0, ::, empty) becomes 127.0.0.1, which the API's
// certificate always names.
func localAddr(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return net.JoinHostPort("127.0.0.1", port)
	}
	return listen
}
