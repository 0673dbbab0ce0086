package main

import (
	"context"
	"io"
	"strings"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

var serverGroupPolicies = []string{"affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity"}

// parsePolicy maps the CLI spelling (anti-affinity) to the enum.
func parsePolicy(s string) (minicloudv1.ServerGroupPolicy, error) {
	v, ok := minicloudv1.ServerGroupPolicy_value["SERVER_GROUP_POLICY_"+strings.ToUpper(strings.ReplaceAll(s, "-", "_"))]
	if !ok || v == 0 {
		return 0, usagef("--policy %q: must be one of %s", s, strings.Join(serverGroupPolicies, ", "))
	}
	return minicloudv1.ServerGroupPolicy(v), nil
}

func policyName(p minicloudv1.ServerGroupPolicy) string {
	return strings.ToLower(strings.ReplaceAll(enumName(p.String(), "SERVER_GROUP_POLICY_"), "_", "-"))
}

func (a *app) newServerGroupCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "server-group", Short: "Manage server groups (affinity and anti-affinity)"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListServerGroupsRequest{Project: a.project()}, c.ServerGroups.ListServerGroups, 0)
		var names []string
		for _, g := range resp.GetServerGroups() {
			names = append(names, g.GetMeta().GetName())
		}
		return names, err
	})

	create := &cobra.Command{Use: "create NAME --policy POLICY", Short: "Create a server group", Args: exactArgs("NAME")}
	policy := create.Flags().String("policy", "", "placement policy: "+strings.Join(serverGroupPolicies, "|"))
	create.RegisterFlagCompletionFunc("policy", cobra.FixedCompletions(serverGroupPolicies, cobra.ShellCompDirectiveNoFileComp))
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "policy"); err != nil {
			return err
		}
		p, err := parsePolicy(*policy)
		if err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		g, err := c.ServerGroups.CreateServerGroup(cmd.Context(), &minicloudv1.CreateServerGroupRequest{Name: args[0], Project: a.project(), Policy: p})
		if err != nil {
			return err
		}
		return printMessage(a.out, *createOut, g, func(w io.Writer) error { return serverGroupTable(w, []*minicloudv1.ServerGroup{g}) })
	}

	list := listCommand(a, "List server groups",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListServerGroupsResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListServerGroupsRequest{Project: a.project()}, c.ServerGroups.ListServerGroups, 0)
		},
		func(w io.Writer, r *minicloudv1.ListServerGroupsResponse) error {
			return serverGroupTable(w, r.GetServerGroups())
		})
	show := showCommand(a, "Show a server group", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.ServerGroup, error) {
			return c.ServerGroups.GetServerGroup(ctx, &minicloudv1.GetServerGroupRequest{Name: name, Project: a.project()})
		},
		func(w io.Writer, g *minicloudv1.ServerGroup) error {
			return serverGroupTable(w, []*minicloudv1.ServerGroup{g})
		})
	del := nameCommand(a, "delete", "Delete a server group", "server-group", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.ServerGroups.DeleteServerGroup(ctx, &minicloudv1.DeleteServerGroupRequest{Name: name, Project: a.project()}))
		})
	cmd.AddCommand(create, list, show, del)
	return cmd
}

func serverGroupTable(w io.Writer, groups []*minicloudv1.ServerGroup) error {
	rows := make([][]string, 0, len(groups))
	for _, g := range groups {
		rows = append(rows, []string{g.GetMeta().GetName(), policyName(g.GetPolicy()), age(g.GetMeta().GetCreateTime())})
	}
	return writeTable(w, []string{"NAME", "POLICY", "AGE"}, rows)
}
