package main

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/minicloud/minicloud/agent"
	"github.com/minicloud/minicloud/agent/hypervisor/libvirt"
)

func init() {
	extraCommands = append(extraCommands, newFenceGuardCommand)
}

// newFenceGuardCommand is `minicloudd fence-guard`: self-fencing that does
// not need a live agent (agent/fenceguard.go). Run it beside the agent,
// under its own supervisor, with the agent's --data-dir and --fence-after.
func newFenceGuardCommand() *cobra.Command {
	var (
		dataDir, socket string
		fenceAfter      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "fence-guard",
		Short: "Destroy this host's domains when its agent has lost contact with the API for --fence-after, even if the agent is dead",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if fenceAfter <= 0 {
				return fmt.Errorf("--fence-after is required: the agent's own --fence-after (shorter than the 15s lease)")
			}
			log := slog.Default().With("component", "fence-guard")
			hv := libvirt.New(libvirt.Options{Socket: socket, Logger: log})
			defer hv.Close()
			stateDir := filepath.Join(dataDir, "agent")
			log.Info("fence guard running", "state_dir", stateDir, "fence_after", fenceAfter)
			return agent.FenceGuard(cmd.Context(), stateDir, fenceAfter, hv, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&dataDir, "data-dir", "/var/lib/minicloud", "the agent's data directory (the agent uses DIR/agent)")
	fl.DurationVar(&fenceAfter, "fence-after", 0, "the agent's --fence-after")
	fl.StringVar(&socket, "libvirt-socket", libvirt.DefaultSocket, "libvirtd's read-write unix socket (qemu:///system)")
	return cmd
}
