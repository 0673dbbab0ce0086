package main

import (
	"context"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

func (a *app) newFlavorCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "flavor", Short: "Manage flavors (VM sizes)"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListFlavorsRequest{}, c.Flavors.ListFlavors, 0)
		var names []string
		for _, f := range resp.GetFlavors() {
			names = append(names, f.GetMeta().GetName())
		}
		return names, err
	})

	create := &cobra.Command{Use: "create NAME --vcpus N --memory-mib N --disk-gib N", Short: "Create a flavor", Args: exactArgs("NAME")}
	var req minicloudv1.CreateFlavorRequest
	create.Flags().Int32Var(&req.Vcpus, "vcpus", 0, "virtual CPUs")
	create.Flags().Int64Var(&req.MemoryMib, "memory-mib", 0, "memory in MiB")
	create.Flags().Int64Var(&req.DiskGib, "disk-gib", 0, "root disk in GiB")
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "vcpus", "memory-mib", "disk-gib"); err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		req.Name = args[0]
		f, err := c.Flavors.CreateFlavor(cmd.Context(), &req)
		if err != nil {
			return err
		}
		return printMessage(a.out, *createOut, f, func(w io.Writer) error { return flavorTable(w, []*minicloudv1.Flavor{f}) })
	}

	list := listCommand(a, "List flavors",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListFlavorsResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListFlavorsRequest{}, c.Flavors.ListFlavors, 0)
		},
		func(w io.Writer, r *minicloudv1.ListFlavorsResponse) error { return flavorTable(w, r.GetFlavors()) })
	show := showCommand(a, "Show a flavor", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.Flavor, error) {
			return c.Flavors.GetFlavor(ctx, &minicloudv1.GetFlavorRequest{Name: name})
		},
		func(w io.Writer, f *minicloudv1.Flavor) error { return flavorTable(w, []*minicloudv1.Flavor{f}) })
	del := nameCommand(a, "delete", "Delete a flavor no VM uses", "flavor", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Flavors.DeleteFlavor(ctx, &minicloudv1.DeleteFlavorRequest{Name: name}))
		})
	cmd.AddCommand(create, list, show, del)
	return cmd
}

func flavorTable(w io.Writer, flavors []*minicloudv1.Flavor) error {
	rows := make([][]string, 0, len(flavors))
	for _, f := range flavors {
		rows = append(rows, []string{
			f.GetMeta().GetName(),
			strconv.Itoa(int(f.GetVcpus())),
			strconv.FormatInt(f.GetMemoryMib(), 10),
			strconv.FormatInt(f.GetDiskGib(), 10),
			age(f.GetMeta().GetCreateTime()),
		})
	}
	return writeTable(w, []string{"NAME", "VCPUS", "MEMORY-MIB", "DISK-GIB", "AGE"}, rows)
}

// requireFlags reports the first of names that was not given as a usage
// error. (cobra's own check runs after our hooks and returns a plain error.)
func requireFlags(cmd *cobra.Command, names ...string) error {
	for _, n := range names {
		if !cmd.Flags().Changed(n) {
			return usagef("%s: --%s is required (see '%s --help')", cmd.CommandPath(), n, cmd.CommandPath())
		}
	}
	return nil
}
