package main

import (
	"io"
	"strconv"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// quotaRow is one dimension of a quota as the CLI shows and sets it: the
// flag name is the table's resource name.
type quotaRow struct {
	flag, help string
	used       func(*minicloudv1.QuotaUsage) int64
	field      func(*minicloudv1.QuotaLimits) **int64
	bytes      bool
}

var quotaRows = []quotaRow{
	{"instances", "VMs", (*minicloudv1.QuotaUsage).GetInstances, func(l *minicloudv1.QuotaLimits) **int64 { return &l.Instances }, false},
	{"vcpus", "virtual CPUs of all VMs", (*minicloudv1.QuotaUsage).GetVcpus, func(l *minicloudv1.QuotaLimits) **int64 { return &l.Vcpus }, false},
	{"memory-mib", "memory of all VMs, MiB", (*minicloudv1.QuotaUsage).GetMemoryMib, func(l *minicloudv1.QuotaLimits) **int64 { return &l.MemoryMib }, false},
	{"disk-gib", "root disks of all VMs, GiB", (*minicloudv1.QuotaUsage).GetDiskGib, func(l *minicloudv1.QuotaLimits) **int64 { return &l.DiskGib }, false},
	{"networks", "networks", (*minicloudv1.QuotaUsage).GetNetworks, func(l *minicloudv1.QuotaLimits) **int64 { return &l.Networks }, false},
	{"server-groups", "server groups", (*minicloudv1.QuotaUsage).GetServerGroups, func(l *minicloudv1.QuotaLimits) **int64 { return &l.ServerGroups }, false},
	{"image-bytes", "bytes of the project's images", (*minicloudv1.QuotaUsage).GetImageBytes, func(l *minicloudv1.QuotaLimits) **int64 { return &l.ImageBytes }, true},
}

func (a *app) newQuotaCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "quota", Short: "Show and set the quotas of projects"})

	show := &cobra.Command{
		Use:   "show [PROJECT]",
		Short: "Show a project's limits and what it uses (default: the current project)",
		Args:  cobra.MaximumNArgs(1),
	}
	showOut := addOutputFlag(show)
	show.RunE = func(cmd *cobra.Command, args []string) error {
		project := a.project()
		if len(args) == 1 {
			project = args[0]
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		q, err := c.Quotas.GetQuota(cmd.Context(), &minicloudv1.GetQuotaRequest{Project: project})
		if err != nil {
			return err
		}
		return printMessage(a.out, *showOut, q, func(w io.Writer) error { return quotaTable(w, q) })
	}

	set := &cobra.Command{
		Use:   "set PROJECT [--instances N] [--vcpus N] [--memory-mib N] [--disk-gib N] [--networks N] [--server-groups N] [--image-bytes N] [--reset]",
		Short: "Set a project's limits (admin); -1 is unlimited, a flag not given keeps its value",
		Args:  exactArgs("PROJECT"),
	}
	values := make([]int64, len(quotaRows))
	for i, r := range quotaRows {
		set.Flags().Int64Var(&values[i], r.flag, 0, "most "+r.help+" (-1: unlimited)")
	}
	reset := set.Flags().Bool("reset", false, "drop every override first: back to the API server's defaults")
	setOut := addOutputFlag(set)
	set.RunE = func(cmd *cobra.Command, args []string) error {
		req := &minicloudv1.SetQuotaRequest{Project: args[0], Limits: &minicloudv1.QuotaLimits{}, ResetToDefaults: *reset}
		changed := *reset
		for i, r := range quotaRows {
			if cmd.Flags().Changed(r.flag) {
				v := values[i]
				*r.field(req.Limits) = &v
				changed = true
			}
		}
		if !changed {
			return usagef("%s: give at least one limit, or --reset (see '%s --help')", cmd.CommandPath(), cmd.CommandPath())
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		q, err := c.Quotas.SetQuota(cmd.Context(), req)
		if err != nil {
			return err
		}
		return printMessage(a.out, *setOut, q, func(w io.Writer) error { return quotaTable(w, q) })
	}
	cmd.AddCommand(show, set)
	return cmd
}

// quotaTable shows one row per resource: used, limit, and whether the
// limit is the project's own or the default.
func quotaTable(w io.Writer, q *minicloudv1.Quota) error {
	limits, overrides := q.GetLimits(), q.GetOverrides()
	if limits == nil {
		limits = &minicloudv1.QuotaLimits{}
	}
	if overrides == nil {
		overrides = &minicloudv1.QuotaLimits{}
	}
	rows := make([][]string, 0, len(quotaRows))
	for _, r := range quotaRows {
		format := func(v int64) string {
			if r.bytes {
				return bytesIEC(v)
			}
			return strconv.FormatInt(v, 10)
		}
		limit := "unlimited"
		if l := *r.field(limits); l != nil && *l >= 0 {
			limit = format(*l)
		}
		source := "default"
		if *r.field(overrides) != nil {
			source = "project"
		}
		rows = append(rows, []string{r.flag, format(r.used(q.GetUsage())), limit, source})
	}
	return writeTable(w, []string{"RESOURCE", "USED", "LIMIT", "SET BY"}, rows)
}
