package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
)

// roleEnv is what the all-in-one hands to every role it runs.
type roleEnv struct {
	// Etcd is the shared etcd client (embedded or remote).
	Etcd *clientv3.Client
	// APIAddr is the API's gRPC address, for roles that talk to it.
	APIAddr string
	// DataDir is the all-in-one's data directory; roles use subdirectories.
	DataDir string
}

// role runs until ctx ends and then returns nil (or fails with an error,
// which stops the whole all-in-one).
type role func(ctx context.Context, env roleEnv) error

// allInOneRoles are the roles started after the API is listening.
//
// >>> Other roles (scheduler, agent + metadata) register here, e.g. from
// >>> scheduler.go: func init() { allInOneRoles = append(allInOneRoles, namedRole{"scheduler", runSchedulerRole}) }
var allInOneRoles []namedRole

type namedRole struct {
	name string
	run  role
}

func newAllInOneCommand() *cobra.Command {
	var f apiFlags
	cmd := &cobra.Command{
		Use:   "all-in-one",
		Short: "Run embedded etcd, API, scheduler and agent in one process",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAllInOne(cmd.Context(), f)
		},
	}
	f.addFlags(cmd)
	for _, hook := range allInOneFlagHooks {
		hook(cmd)
	}
	return cmd
}

// allInOneFlagHooks let roles add their own flags to all-in-one.
var allInOneFlagHooks []func(cmd *cobra.Command)

func runAllInOne(ctx context.Context, f apiFlags) error {
	if err := privateDataDir(f.dataDir); err != nil {
		return err
	}
	conn, err := f.etcd.open(ctx, f.dataDir, true)
	if err != nil {
		return err
	}
	defer conn.Close()

	g, gctx := errgroup.WithContext(ctx)
	apiReady := make(chan struct{})
	g.Go(func() error { return runAPI(gctx, f, conn.Client, apiReady) })
	select {
	case <-apiReady:
	case <-gctx.Done():
		return g.Wait()
	}
	env := roleEnv{Etcd: conn.Client, APIAddr: f.listen, DataDir: f.dataDir}
	for _, r := range allInOneRoles {
		slog.Info("starting role", "role", r.name)
		g.Go(func() error {
			if err := r.run(gctx, env); err != nil {
				return fmt.Errorf("%s: %w", r.name, err)
			}
			return nil
		})
	}
	slog.Info("all-in-one running", "api", f.listen, "data", f.dataDir)
	return g.Wait()
}
