package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/client"
)

// adminConfigName is the CLI configuration with an admin token that every
// API replica keeps in its data directory (0600, root's), as kubeadm keeps
// admin.conf: `make up` installs it as ~/.config/minicloud/config.yaml.
const adminConfigName = "admin.yaml"

// Lifetime of the bootstrap admin token, and how long before its expiry a
// start replaces it.
const (
	adminTokenTTL   = 365 * 24 * time.Hour
	adminTokenRenew = 30 * 24 * time.Hour
)

// ensureAdminConfig makes sure DATA_DIR/admin.yaml holds a valid admin
// token (bootstrapping the default project and the admin user on a new
// cluster) and names this replica's endpoint and the CA.
func ensureAdminConfig(ctx context.Context, f apiFlags, cli *clientv3.Client) error {
	path := filepath.Join(f.dataDir, adminConfigName)
	want := client.Config{Endpoint: localAddr(f.listen), CA: filepath.Join(f.dataDir, caFileName)}
	have, err := client.LoadConfig(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		slog.Warn("admin config unreadable: writing a new one", "path", path, "err", err)
	}
	want.Token = have.Token
	ok, err := apiserver.TokenValidFor(ctx, cli, have.Token, adminTokenRenew)
	if err != nil {
		return err
	}
	if !ok {
		if want.Token, err = apiserver.BootstrapAdmin(ctx, cli, adminTokenTTL); err != nil {
			return fmt.Errorf("bootstrap admin: %w", err)
		}
		slog.Info("admin token issued", "config", path)
	}
	if want.Endpoint == have.Endpoint && want.CA == have.CA && want.Token == have.Token && len(have.Endpoints) == 0 {
		return nil
	}
	return want.Write(path)
}
