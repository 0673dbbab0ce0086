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
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a running embedded etcd.
type Server struct {
	etcd     *embed.Etcd
	Endpoint string
}

// Config says where the embedded etcd keeps its data and listens.
type Config struct {
	// Dir is the data directory (created if missing).
	Dir string
	// ClientAddr is host:port for clients; "127.0.0.1:0" picks a free port.
	ClientAddr string
	// PeerAddr is host:port for peers; "127.0.0.1:0" picks a free port.
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
	if c.ClientAddr == "" {
		c.ClientAddr = "127.0.0.1:2379"
	}
	if c.PeerAddr == "" {
		c.PeerAddr = "127.0.0.1:0"
	}
	clientURL, err := listenURL(c.ClientAddr)
	if err != nil {
		return nil, fmt.Errorf("etcd client address: %w", err)
	}
	peerURL, err := listenURL(c.PeerAddr)
	if err != nil {
		return nil, fmt.Errorf("etcd peer address: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Dir = c.Dir
	cfg.Name = "minicloud"
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = []url.URL{*peerURL}
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
	return &Server{etcd: e, Endpoint: e.Clients[0].Addr().String()}, nil
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
