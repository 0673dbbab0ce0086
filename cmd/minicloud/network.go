package main

import (
	"context"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

func (a *app) newNetworkCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "network", Short: "Manage networks"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListNetworksRequest{Project: a.project()}, c.Networks.ListNetworks, 0)
		var names []string
		for _, n := range resp.GetNetworks() {
			names = append(names, n.GetMeta().GetName())
		}
		return names, err
	})

	create := &cobra.Command{Use: "create NAME --cidr CIDR", Short: "Create a network", Args: exactArgs("NAME")}
	var req minicloudv1.CreateNetworkRequest
	var noNAT bool
	create.Flags().StringVar(&req.Cidr, "cidr", "", "IPv4 prefix, e.g. 10.88.0.0/24")
	create.Flags().StringVar(&req.Gateway, "gateway", "", "gateway address (default: first address of the CIDR)")
	create.Flags().Int32Var(&req.Mtu, "mtu", 0, "MTU (default 1450: a 1500-byte underlay minus VXLAN's 50)")
	create.Flags().BoolVar(&noNAT, "no-nat", false, "do not masquerade egress traffic through the host")
	create.Flags().StringSliceVar(&req.DnsServers, "dns-server", nil, "resolver given to guests instead of the gateway (repeatable, at most 3)")
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "cidr"); err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		req.Name, req.Project, req.DisableNat = args[0], a.project(), noNAT
		n, err := c.Networks.CreateNetwork(cmd.Context(), &req)
		if err != nil {
			return err
		}
		return printMessage(a.out, *createOut, n, func(w io.Writer) error { return networkTable(w, []*minicloudv1.Network{n}) })
	}

	list := listCommand(a, "List networks",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListNetworksResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListNetworksRequest{Project: a.project()}, c.Networks.ListNetworks, 0)
		},
		func(w io.Writer, r *minicloudv1.ListNetworksResponse) error { return networkTable(w, r.GetNetworks()) })
	show := showCommand(a, "Show a network", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.Network, error) {
			return c.Networks.GetNetwork(ctx, &minicloudv1.GetNetworkRequest{Name: name, Project: a.project()})
		},
		func(w io.Writer, n *minicloudv1.Network) error { return networkTable(w, []*minicloudv1.Network{n}) })
	del := nameCommand(a, "delete", "Delete a network no VM uses", "network", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Networks.DeleteNetwork(ctx, &minicloudv1.DeleteNetworkRequest{Name: name, Project: a.project()}))
		})
	cmd.AddCommand(create, list, show, del)
	return cmd
}

func networkTable(w io.Writer, networks []*minicloudv1.Network) error {
	rows := make([][]string, 0, len(networks))
	for _, n := range networks {
		nat := "no"
		if n.GetNat() {
			nat = "yes"
		}
		mtu := "-"
		if n.GetMtu() != 0 {
			mtu = strconv.Itoa(int(n.GetMtu()))
		}
		vni := "-"
		if n.GetVni() != 0 {
			vni = strconv.FormatUint(uint64(n.GetVni()), 10)
		}
		rows = append(rows, []string{
			n.GetMeta().GetName(), n.GetCidr(), orDash(n.GetGateway()), mtu, nat, vni, orDash(n.GetBridge()), age(n.GetMeta().GetCreateTime()),
		})
	}
	return writeTable(w, []string{"NAME", "CIDR", "GATEWAY", "MTU", "NAT", "VNI", "BRIDGE", "AGE"}, rows)
}
