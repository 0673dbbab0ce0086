// Package etcdembed runs an etcd server inside the minicloud process: the
// single-node default of the all-in-one, and the real store of the tests.
package etcdembed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a running embedded etcd.
type Server struct {
	etcd *embed.Etcd
	// Endpoint is the client endpoint: host:port, or unix:///path for a
	// Config.Socket.
	Endpoint string
}

// Config says where the embedded etcd keeps its data and listens.
type Config struct {
	// Dir is the data directory (created if missing).
	Dir string
	// Socket, when set, is the path of a unix socket that is the server's
	// only client listener; its directory is created (or tightened) to
	// 0700, so only this process's user (root) can connect: no other local
	// user reaches a TCP port on loopback. ClientAddr must then be empty.
	Socket string
	// ClientAddr is host:port for clients; "127.0.0.1:0" picks a free port.
	// Any local user can connect to it: tests and benchmarks only.
	ClientAddr string
	// PeerAddr is host:port for peers; "127.0.0.1:0" picks a free port.
	// Empty: no peer listener at all. A single-member cluster never talks
	// to peers, and a peer port is one more door for local users.
	PeerAddr string
	// Quiet silences etcd's own logs.
	Quiet bool
}

// Start starts etcd and waits until it serves. A ":0" port is picked
// before etcd binds it (etcd must advertise the real one), so another
// process can take it in between: then Start tries again with new ports.
func Start(ctx context.Context, c Config) (*Server, error) {
	auto := strings.HasSuffix(c.ClientAddr, ":0") || strings.HasSuffix(c.PeerAddr, ":0")
	for attempt := 1; ; attempt++ {
		s, err := start(ctx, c)
		if err == nil || !auto || attempt == 5 || !errors.Is(err, syscall.EADDRINUSE) {
			return s, err
		}
		// A failed start may leave a half-written member directory.
		if rmErr := os.RemoveAll(c.Dir); rmErr != nil {
			return nil, fmt.Errorf("%w (and clearing %s: %v)", err, c.Dir, rmErr)
		}
	}
}

func start(ctx context.Context, c Config) (*Server, error) {
	var clientURL *url.URL
	switch {
	case c.Socket != "" && c.ClientAddr != "":
		return nil, fmt.Errorf("etcd: give a client socket or a client address, not both")
	case c.Socket != "":
		u, err := socketURL(c.Socket)
		if err != nil {
			return nil, err
		}
		clientURL = u
	default:
		if c.ClientAddr == "" {
			c.ClientAddr = "127.0.0.1:2379"
		}
		u, err := listenURL(c.ClientAddr)
		if err != nil {
			return nil, fmt.Errorf("etcd client address: %w", err)
		}
		clientURL = u
	}
	// The member must advertise a peer URL even when nothing listens on it:
	// the only member of a cluster is never dialled by a peer.
	peerURL, _ := url.Parse("http://127.0.0.1:2380")
	if c.PeerAddr != "" {
		u, err := listenURL(c.PeerAddr)
		if err != nil {
			return nil, fmt.Errorf("etcd peer address: %w", err)
		}
		peerURL = u
	}
	cfg := embed.NewConfig()
	cfg.Dir = c.Dir
	cfg.Name = "minicloud"
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = nil
	if c.PeerAddr != "" {
		cfg.ListenPeerUrls = []url.URL{*peerURL}
	}
	cfg.AdvertisePeerUrls = []url.URL{*peerURL}
	cfg.InitialCluster = cfg.Name + "=" + peerURL.String()
	cfg.AutoCompactionMode = "revision"
	cfg.AutoCompactionRetention = "10000"
	// A VM create is a handful of small keys; 2 GiB is room for a long life.
	cfg.QuotaBackendBytes = 2 << 30
	if c.Quiet {
		cfg.LogLevel = "error"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", c.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s did not become ready within 60s", c.Dir)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	endpoint := e.Clients[0].Addr().String()
	if c.Socket != "" {
		endpoint = clientURL.String()
	}
	return &Server{etcd: e, Endpoint: endpoint}, nil
}

// maxSocketPath is sun_path's size minus the terminating NUL.
const maxSocketPath = 107

// socketURL makes the socket's directory private to this user and returns
// the socket's client URL. The directory, not the socket's own mode, is
// what keeps other users out: a socket is created with the process umask,
// and connect(2) needs search permission on every directory of the path.
func socketURL(path string) (*url.URL, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("etcd socket %q: must be an absolute path", path)
	}
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("etcd socket %q: longer than %d bytes (a unix socket path's limit): use a shorter data directory", path, maxSocketPath)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("etcd socket directory: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return nil, fmt.Errorf("etcd socket directory: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("etcd socket directory %s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("etcd socket directory %s belongs to uid %d, not to this process (uid %d): remove it", dir, st.Uid, os.Geteuid())
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("etcd socket directory: %w", err)
	}
	return &url.URL{Scheme: "unix", Path: path}, nil
}

// Client returns a new client of this server.
func (s *Server) Client() (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{s.Endpoint},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
}

// Close stops the server.
func (s *Server) Close() { s.etcd.Close() }

// listenURL resolves a ":0" port to a free one, since etcd advertises the URL
// it is given.
func listenURL(addr string) (*url.URL, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if port == "0" {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, err
		}
		addr = l.Addr().String()
		l.Close()
	}
	return url.Parse("http://" + addr)
}

// ListenAddrs reports every address the server listens on (clients, peers),
// so tests can check that nothing is open beyond what was asked.
func (s *Server) ListenAddrs() []net.Addr {
	var out []net.Addr
	for _, l := range s.etcd.Clients {
		out = append(out, l.Addr())
	}
	for _, p := range s.etcd.Peers {
		out = append(out, p.Addr())
	}
	return out
}
