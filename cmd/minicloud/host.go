package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

func (a *app) newHostCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "host", Short: "Inspect and manage hypervisor hosts"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListHostsRequest{}, c.Hosts.ListHosts, 0)
		var names []string
		for _, h := range resp.GetHosts() {
			names = append(names, h.GetMeta().GetName())
		}
		return names, err
	})

	list := listCommand(a, "List hosts",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListHostsResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListHostsRequest{}, c.Hosts.ListHosts, 0)
		},
		func(w io.Writer, r *minicloudv1.ListHostsResponse) error { return hostTable(w, r.GetHosts()) })
	show := showCommand(a, "Show a host", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.Host, error) {
			return c.Hosts.GetHost(ctx, &minicloudv1.GetHostRequest{Name: name})
		}, hostDetails)

	disable := &cobra.Command{Use: "disable NAME [--reason TEXT]", Short: "Stop scheduling new VMs to a host", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	reason := disable.Flags().String("reason", "", "why the host is disabled (shown in host list)")
	disable.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		if _, err := c.Hosts.DisableHost(cmd.Context(), &minicloudv1.DisableHostRequest{Name: args[0], Reason: *reason}); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "host %s disabled\n", args[0])
		return nil
	}

	enable := nameCommand(a, "enable", "Allow scheduling to a host again", "host", "enabled", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Hosts.EnableHost(ctx, &minicloudv1.EnableHostRequest{Name: name}))
		})
	del := nameCommand(a, "delete", "Remove a host that is not UP and holds no VM (its certificates are revoked)", "host", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Hosts.DeleteHost(ctx, &minicloudv1.DeleteHostRequest{Name: name}))
		})
	cmd.AddCommand(list, show, disable, enable, a.newHostFenceCommand(complete), a.newHostEvacuateCommand(complete), del,
		a.newJoinTokenCommand(), a.newRevokeCommand(complete))
	return cmd
}

// hostStatus is up, unreachable or fenced, and disabled.
func hostStatus(h *minicloudv1.Host) string {
	s := strings.ToLower(enumName(h.GetState().String(), "HOST_STATE_"))
	if h.GetDisabled() {
		s += ",disabled"
	}
	return s
}

func usage(alloc, capacity int64) string {
	return strconv.FormatInt(alloc, 10) + "/" + strconv.FormatInt(capacity, 10)
}

func hostTable(w io.Writer, hosts []*minicloudv1.Host) error {
	rows := make([][]string, 0, len(hosts))
	for _, h := range hosts {
		alloc, capy := h.GetAllocated(), h.GetCapacity()
		rows = append(rows, []string{
			h.GetMeta().GetName(),
			hostStatus(h),
			orDash(strings.Join(h.GetHypervisors(), ",")),
			usage(int64(alloc.GetVcpus()), int64(capy.GetVcpus())),
			usage(alloc.GetMemoryMib(), capy.GetMemoryMib()),
			usage(alloc.GetDiskGib(), capy.GetDiskGib()),
			strconv.Itoa(int(h.GetVmCount())),
			orDash(h.GetAvailabilityZone()),
			age(h.GetLastHeartbeat()),
			age(h.GetUnreachableSince()),
		})
	}
	return writeTable(w, []string{"NAME", "STATE", "HYPERVISORS", "VCPUS", "MEMORY-MIB", "DISK-GIB", "VMS", "AZ", "HEARTBEAT", "UNREACHABLE"}, rows)
}

func hostDetails(w io.Writer, h *minicloudv1.Host) error {
	alloc, capy, r := h.GetAllocated(), h.GetCapacity(), h.GetAllocationRatios()
	fields := []field{
		{"Name", h.GetMeta().GetName()},
		{"State", hostStatus(h)},
		{"Address", orDash(h.GetAddress())},
		{"Tunnel IP", orDash(h.GetTunnelIp())},
		{"Hypervisors", orDash(strings.Join(h.GetHypervisors(), ","))},
		{"Availability zone", orDash(h.GetAvailabilityZone())},
		{"vCPUs (allocated/capacity)", usage(int64(alloc.GetVcpus()), int64(capy.GetVcpus()))},
		{"Memory MiB (allocated/capacity)", usage(alloc.GetMemoryMib(), capy.GetMemoryMib())},
		{"Disk GiB (allocated/capacity)", usage(alloc.GetDiskGib(), capy.GetDiskGib())},
		{"Allocation ratios", fmt.Sprintf("cpu %g, ram %g, disk %g", r.GetCpu(), r.GetRam(), r.GetDisk())},
		{"VMs", strconv.Itoa(int(h.GetVmCount()))},
		{"Last heartbeat", timestamp(h.GetLastHeartbeat())},
		{"Agent version", orDash(h.GetAgentVersion())},
		{"Self-fencing", selfFencing(h)},
	}
	if h.GetDisabled() {
		fields = append(fields, field{"Disabled reason", orDash(h.GetDisabledReason())})
	}
	return writeFields(w, append(fields, hostFailureFields(h)...))
}
