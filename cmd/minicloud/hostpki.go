package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

// newJoinTokenCommand is `minicloud host join-token create`: the
// operator's half of a host joining (docs/operations.md).
func (a *app) newJoinTokenCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "join-token", Short: "Make one-time tokens for new hosts to join with"})
	create := &cobra.Command{Use: "create [--ttl 1h]", Short: "Create a one-time join token and print the agent's join command", Args: noArgs}
	ttl := create.Flags().Duration("ttl", time.Hour, "how long the token may be used (1m to 168h)")
	desc := create.Flags().String("description", "", "what the token is for (kept with it)")
	out := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, _ []string) error {
		if *ttl < time.Second {
			return usagef("--ttl %s: give a duration such as 30m or 2h", *ttl)
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.Hosts.CreateJoinToken(cmd.Context(), &minicloudv1.CreateJoinTokenRequest{TtlSeconds: int64(*ttl / time.Second), Description: *desc})
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, resp, func(w io.Writer) error { return joinTokenText(w, resp, a.endpoint) })
	}
	list := listCommand(a, "List unspent join tokens (ids only: secrets are not kept)",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListJoinTokensResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListJoinTokensRequest{}, c.Hosts.ListJoinTokens, 0)
		},
		func(w io.Writer, r *minicloudv1.ListJoinTokensResponse) error {
			rows := make([][]string, 0, len(r.GetTokens()))
			for _, t := range r.GetTokens() {
				rows = append(rows, []string{t.GetId(), timestamp(t.GetExpireTime()), orDash(t.GetDescription())})
			}
			return writeTable(w, []string{"ID", "EXPIRES", "DESCRIPTION"}, rows)
		})
	del := nameCommand(a, "delete", "Withdraw an unspent join token", "join token", "deleted", nil,
		func(ctx context.Context, c *client.Client, id string) error {
			return ignoreResult(c.Hosts.DeleteJoinToken(ctx, &minicloudv1.DeleteJoinTokenRequest{Id: id}))
		})
	del.Use = "delete ID"
	cmd.AddCommand(create, list, del)
	return cmd
}

func joinTokenText(w io.Writer, r *minicloudv1.CreateJoinTokenResponse, endpoint string) error {
	if err := writeFields(w, []field{
		{"Token", r.GetToken()},
		{"Expires", timestamp(r.GetExpireTime())},
		{"CA hash", r.GetCaHash()},
	}); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\nOn the new host (the token works once; the host keeps its certificate in its data directory):\n\n  minicloudd agent --api %s --host-name NAME --join %s --ca-hash %s\n",
		endpoint, r.GetToken(), r.GetCaHash())
	return err
}

// newRevokeCommand is `minicloud host revoke NAME`.
func (a *app) newRevokeCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{Use: "revoke NAME", Short: "Revoke a host's certificates: every call it makes is refused until it joins again", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.Hosts.RevokeHost(cmd.Context(), &minicloudv1.RevokeHostRequest{Name: args[0]})
		if err != nil {
			return err
		}
		fmt.Fprintf(a.out, "host %s revoked (certificate serials %s)\n", args[0], strings.Join(resp.GetRevokedSerials(), ", "))
		return nil
	}
	return cmd
}
