package main

import (
	"context"
	"fmt"
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
		resp, err := c.ServerGroups.ListServerGroups(ctx, &minicloudv1.ListServerGroupsRequest{Project: a.project()})
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

	list := &cobra.Command{Use: "list", Short: "List server groups", Args: noArgs}
	listOut := addOutputFlag(list)
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.ServerGroups.ListServerGroups(cmd.Context(), &minicloudv1.ListServerGroupsRequest{Project: a.project()})
		if err != nil {
			return err
		}
		return printMessage(a.out, *listOut, resp, func(w io.Writer) error { return serverGroupTable(w, resp.GetServerGroups()) })
	}

	show := &cobra.Command{Use: "show NAME", Short: "Show a server group", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	showOut := addOutputFlag(show)
	show.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		g, err := c.ServerGroups.GetServerGroup(cmd.Context(), &minicloudv1.GetServerGroupRequest{Name: args[0], Project: a.project()})
		if err != nil {
			return err
		}
		return printMessage(a.out, *showOut, g, func(w io.Writer) error { return serverGroupTable(w, []*minicloudv1.ServerGroup{g}) })
	}

	del := &cobra.Command{Use: "delete NAME", Short: "Delete a server group", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	del.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		if _, err := c.ServerGroups.DeleteServerGroup(cmd.Context(), &minicloudv1.DeleteServerGroupRequest{Name: args[0], Project: a.project()}); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "server-group %s deleted\n", args[0])
		return nil
	}
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
