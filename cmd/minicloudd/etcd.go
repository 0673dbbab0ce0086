package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/minicloud/minicloud/pkg/etcdembed"
)

// embeddedEtcdSocket is where the all-in-one's embedded etcd listens: a
// unix socket in a 0700 directory, so only root (the daemon's user) can
// connect. A TCP port on loopback would be open to every local user, and
// etcd holds the cluster CA's key and every VM's user-data.
func embeddedEtcdSocket(dataDir string) string {
	return filepath.Join(dataDir, "run", "etcd.sock")
}

// etcdFlags choose the store: a remote etcd cluster (--etcd-endpoints, with
// optional TLS) or, for roles that allow it, an etcd embedded in this
// process under the data directory. Every role uses the same flags.
type etcdFlags struct {
	endpoints []string
	caCert    string
	cert      string
	key       string
}

func (f *etcdFlags) addFlags(fs *pflag.FlagSet) {
	fs.StringSliceVar(&f.endpoints, "etcd-endpoints", nil, "etcd client URLs, comma separated (e.g. https://10.0.0.1:2379); empty: embedded etcd (all-in-one only)")
	fs.StringVar(&f.caCert, "etcd-cacert", "", "CA bundle to verify etcd's server certificate")
	fs.StringVar(&f.cert, "etcd-cert", "", "client certificate for etcd")
	fs.StringVar(&f.key, "etcd-key", "", "client key for etcd")
}

// etcdConn is an open etcd client and whatever must be closed with it.
type etcdConn struct {
	Client   *clientv3.Client
	embedded *etcdembed.Server
}

// Close closes the client, then the embedded server if any.
func (c *etcdConn) Close() {
	if c.Client != nil {
		c.Client.Close()
	}
	if c.embedded != nil {
		c.embedded.Close()
	}
}

// open connects to the remote cluster, or starts an embedded etcd in
// dataDir/etcd when no endpoints are given and allowEmbedded is set.
func (f *etcdFlags) open(ctx context.Context, dataDir string, allowEmbedded bool) (*etcdConn, error) {
	if len(f.endpoints) == 0 {
		if !allowEmbedded {
			return nil, fmt.Errorf("--etcd-endpoints is required (only all-in-one embeds etcd)")
		}
		dir, sock := filepath.Join(dataDir, "etcd"), embeddedEtcdSocket(dataDir)
		slog.Info("starting embedded etcd", "dir", dir, "socket", sock)
		// No peer listener: the one member never talks to peers.
		srv, err := etcdembed.Start(ctx, etcdembed.Config{Dir: dir, Socket: sock, Quiet: true})
		if err != nil {
			return nil, err
		}
		cli, err := srv.Client()
		if err != nil {
			srv.Close()
			return nil, fmt.Errorf("connect to embedded etcd: %w", err)
		}
		return &etcdConn{Client: cli, embedded: srv}, nil
	}
	var tlsCfg *tls.Config
	if f.caCert != "" || f.cert != "" || f.key != "" {
		info := transport.TLSInfo{TrustedCAFile: f.caCert, CertFile: f.cert, KeyFile: f.key}
		var err error
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   f.endpoints,
		DialTimeout: 5 * time.Second,
		TLS:         tlsCfg,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %s: %w", strings.Join(f.endpoints, ","), err)
	}
	// Fail now, with the endpoint in the message, rather than on the first
	// request.
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := cli.Status(sctx, f.endpoints[0]); err != nil {
		cli.Close()
		return nil, fmt.Errorf("etcd at %s does not answer: %w", f.endpoints[0], err)
	}
	return &etcdConn{Client: cli}, nil
}
