package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/scheduler"
	"github.com/minicloud/minicloud/scheduler/placement"
)

// The scheduler role: `minicloudd scheduler` on its own, and a role of
// `minicloudd all-in-one` (registered below, flags prefixed "scheduler-").
func init() {
	extraCommands = append(extraCommands, newSchedulerCommand)
	allInOneFlagHooks = append(allInOneFlagHooks, func(cmd *cobra.Command) {
		allInOneScheduler.addFlags(cmd.Flags(), "scheduler-", "")
	})
	allInOneRoles = append(allInOneRoles, namedRole{name: "scheduler", run: func(ctx context.Context, env roleEnv) error {
		return runScheduler(ctx, env.Etcd, slog.Default().With("role", "scheduler"), allInOneScheduler)
	}})
}

// schedulerOptions are the scheduler's flags.
type schedulerOptions struct {
	maxAttempts   int
	weigher       string
	workers       int
	sampleSize    int
	metricsListen string
}

// allInOneScheduler holds the all-in-one's --scheduler-* flags.
var allInOneScheduler schedulerOptions

// defaultSchedulerMetricsListen follows the port convention (API 8640/8641,
// agent 8642/8643, web console 8644).
const defaultSchedulerMetricsListen = "127.0.0.1:8645"

func (o *schedulerOptions) addFlags(fs *pflag.FlagSet, prefix, metricsDefault string) {
	fs.IntVar(&o.maxAttempts, prefix+"max-attempts", scheduler.DefaultMaxAttempts, "hosts a VM is placed on (first placement plus reschedules after a failed create) before it goes to ERROR")
	fs.StringVar(&o.weigher, prefix+"weigher", string(placement.Spread), "placement strategy: spread (most free memory first) or pack (least free memory first)")
	fs.IntVar(&o.workers, prefix+"workers", scheduler.DefaultWorkers, "VMs decided and committed concurrently")
	fs.IntVar(&o.sampleSize, prefix+"sample-size", placement.DefaultSampleSize, "feasible hosts ranked per decision, in random order (-1: all; see docs/scheduler.md)")
	fs.StringVar(&o.metricsListen, prefix+"metrics-listen", metricsDefault, "HTTP listen address for the scheduler's /metrics (empty: off)")
}

func newSchedulerCommand() *cobra.Command {
	var etcd etcdFlags
	var o schedulerOptions
	cmd := &cobra.Command{
		Use:   "scheduler",
		Short: "Assign PENDING VMs to hosts (several replicas may run at once)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			conn, err := etcd.open(ctx, "", false)
			if err != nil {
				return err
			}
			defer conn.Close()
			return runScheduler(ctx, conn.Client, slog.Default(), o)
		},
	}
	etcd.addFlags(cmd.Flags())
	o.addFlags(cmd.Flags(), "", defaultSchedulerMetricsListen)
	return cmd
}

// runScheduler runs one scheduler replica on an open etcd client until ctx
// ends; it returns nil on a clean shutdown.
func runScheduler(ctx context.Context, cli *clientv3.Client, log *slog.Logger, o schedulerOptions) error {
	policy, err := placement.NewPolicy(placement.Strategy(o.weigher))
	if err != nil {
		return fmt.Errorf("--weigher: %w", err)
	}
	if o.sampleSize == 0 || o.sampleSize < -1 {
		return fmt.Errorf("--sample-size %d: use a positive number of hosts, or -1 for all", o.sampleSize)
	}
	if o.maxAttempts < 1 {
		return fmt.Errorf("--max-attempts %d: must be at least 1", o.maxAttempts)
	}
	policy.SampleSize = o.sampleSize
	cfg := scheduler.Config{Policy: policy, MaxAttempts: o.maxAttempts, Workers: o.workers, Log: log}

	var metricsSrv *http.Server
	reg := prometheus.NewRegistry()
	if o.metricsListen != "" {
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		cfg.Observe = scheduler.NewMetrics(reg).Observe
	}
	s, err := scheduler.New(cli, cfg)
	if err != nil {
		return err
	}
	if o.metricsListen != "" {
		reg.MustRegister(s.PendingCollector(), s.ClusterCollector())
		lis, err := net.Listen("tcp", o.metricsListen)
		if err != nil {
			return fmt.Errorf("scheduler metrics listen on %s: %w", o.metricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			log.Info("serving scheduler metrics", "addr", lis.Addr().String())
			if err := metricsSrv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("scheduler metrics server", "err", err)
			}
		}()
	}
	err = s.Run(ctx)
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = metricsSrv.Shutdown(sctx)
	}
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil
	}
	return err
}
