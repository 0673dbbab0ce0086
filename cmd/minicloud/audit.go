package main

import (
	"io"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func (a *app) newAuditCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "audit", Short: "Read the audit log of mutating calls (admin)"})
	list := &cobra.Command{Use: "list [--project P] [--limit N]", Short: "List audit records, newest first", Args: noArgs}
	limit := list.Flags().Int32("limit", 100, "most records to show (at most 1000)")
	out := addOutputFlag(list)
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := minicloudv1.NewAuditServiceClient(c.Conn).ListAuditRecords(cmd.Context(), &minicloudv1.ListAuditRecordsRequest{Project: a.projectFlagOnly(), Limit: *limit})
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, resp, func(w io.Writer) error {
			rows := make([][]string, 0, len(resp.GetRecords()))
			for _, r := range resp.GetRecords() {
				rows = append(rows, []string{timestamp(r.GetTime()), r.GetPrincipal(), orDash(r.GetProject()), r.GetRpc(), orDash(r.GetObject()), r.GetCode(), r.GetRequestId()})
			}
			return writeTable(w, []string{"TIME", "WHO", "PROJECT", "RPC", "OBJECT", "RESULT", "REQUEST"}, rows)
		})
	}
	cmd.AddCommand(list)
	return cmd
}

// projectFlagOnly is the project the user named explicitly (flag or
// environment), without the config file's default: an audit listing is of
// every project unless one is asked for.
func (a *app) projectFlagOnly() string {
	if a.projectFlag != "" {
		return a.projectFlag
	}
	return a.getenv("MINICLOUD_PROJECT")
}
