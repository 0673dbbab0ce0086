// Command minicloudd runs minicloud's daemons, one subcommand per role:
// api, all-in-one (and scheduler and agent, added by those roles).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/minicloud/minicloud/pkg/sysmon"
)

func main() {
	// Before anything starts: the runtime's monitor thread must not park
	// whenever the process idles, which cost the metadata service more
	// CPU than its requests did (pkg/sysmon). Returns only if it did not
	// re-execute.
	if err := sysmon.Reexec(); err != nil {
		fmt.Fprintln(os.Stderr, "minicloudd:", err)
	}
	// SIGTERM and SIGINT cancel the context: every role drains and exits.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := newRootCommand().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "minicloudd:", err)
		os.Exit(1)
	}
}

// globalFlags are shared by every role.
type globalFlags struct {
	logLevel  string
	logFormat string
}

var global globalFlags

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "minicloudd",
		Short:         "minicloud daemons: API server, scheduler, agent, or all of them in one process",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return setupLogging(global.logLevel, global.logFormat)
		},
	}
	root.PersistentFlags().StringVar(&global.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	root.PersistentFlags().StringVar(&global.logFormat, "log-format", "text", "log format: text or json")
	root.AddCommand(newAPICommand(), newAllInOneCommand())
	for _, add := range extraCommands {
		root.AddCommand(add())
	}
	return root
}

// extraCommands lets other roles (scheduler.go, agent.go) add their
// subcommand from an init function without editing this file.
var extraCommands []func() *cobra.Command

func setupLogging(level, format string) error {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return fmt.Errorf("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	var h slog.Handler
	switch format {
	case "text":
		h = slog.NewTextHandler(os.Stderr, opts)
	case "json":
		h = slog.NewJSONHandler(os.Stderr, opts)
	default:
		return fmt.Errorf("--log-format %q: use text or json", format)
	}
	slog.SetDefault(slog.New(h))
	return nil
}
