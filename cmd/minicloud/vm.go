package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

const defaultWaitTimeout = 5 * time.Minute

func (a *app) newVMCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "vm", Short: "Manage virtual machines"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListVMsRequest{Project: a.project()}, c.VMs.ListVMs, 0)
		var names []string
		for _, vm := range resp.GetVms() {
			names = append(names, vm.GetMeta().GetName())
		}
		return names, err
	})
	cmd.AddCommand(
		a.newVMCreateCommand(),
		a.newVMListCommand(),
		a.newVMShowCommand(complete),
		a.newVMDeleteCommand(complete),
		a.newVMActionCommand("start", "Start a stopped VM", complete, func(c *client.Client) vmAction { return c.VMs.StartVM }),
		a.newVMActionCommand("stop", "Shut a VM down (ACPI, then power off)", complete, func(c *client.Client) vmAction { return c.VMs.StopVM }),
		a.newVMActionCommand("reboot", "Reboot a VM", complete, func(c *client.Client) vmAction { return c.VMs.RebootVM }),
		a.newVMConsoleLogCommand(complete),
		a.newVMConsoleCommand(complete),
		a.newVMTopCommand(complete),
		a.newVMEventsCommand(complete),
		a.newVMWaitCommand(complete),
		a.newVMSetCommand(complete),
		a.newVMExposeCommand(complete),
		a.newVMUnexposeCommand(complete),
		a.newVMSSHCommand(complete),
	)
	return cmd
}

// vmCreateOptions are the flags of vm create.
type vmCreateOptions struct {
	image, flavor   string
	networks        []string
	sshKeyFiles     []string
	userData        string
	configDrive     bool
	az, serverGroup string
	wait            bool
	timeout         time.Duration
	guest           guestMetadataFlags
	onHostFailure   string
	restartPolicy   string
}

func (a *app) newVMCreateCommand() *cobra.Command {
	var o vmCreateOptions
	cmd := &cobra.Command{
		Use:   "create NAME --image IMG --flavor FLV",
		Short: "Create a VM",
		Args:  exactArgs("NAME"),
	}
	addVMCreateFlags(cmd, &o)
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		req, err := a.buildCreateRequest(cmd, args[0], &o)
		if err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
		defer cancel()
		vm, err := createWithRetry(ctx, c, req, a.errOut)
		if err != nil {
			return err
		}
		if o.wait {
			vm, err = a.waitVM(ctx, c, vm, waitRunning, o.timeout)
			if err != nil {
				return err
			}
		}
		return printMessage(a.out, *out, vm, func(w io.Writer) error { return vmDetails(w, vm) })
	}
	return cmd
}

func addVMCreateFlags(cmd *cobra.Command, o *vmCreateOptions) {
	f := cmd.Flags()
	f.StringVar(&o.image, "image", "", "image name")
	f.StringVar(&o.flavor, "flavor", "", "flavor name")
	f.StringArrayVar(&o.networks, "network", nil, "network to attach (repeatable; the first is primary; default: the project's \"default\")")
	f.StringArrayVar(&o.sshKeyFiles, "ssh-key", nil, "file of SSH public keys, one per line (repeatable)")
	f.StringVar(&o.userData, "user-data", "", "cloud-init user-data: FILE, @FILE, or - for stdin")
	f.BoolVar(&o.configDrive, "config-drive", false, "also provide metadata on a config drive")
	f.StringVar(&o.az, "az", "", "availability zone")
	f.StringVar(&o.serverGroup, "server-group", "", "server group")
	f.BoolVar(&o.wait, "wait", false, "wait until the VM is RUNNING, printing phase changes")
	f.DurationVar(&o.timeout, "timeout", defaultWaitTimeout, "how long --wait (and retries) may take")
	f.StringVar(&o.onHostFailure, "on-host-failure", "", "when the VM's host is fenced: stop (wait for an operator; default) or evacuate (rebuild it elsewhere from its image at once)")
	f.StringVar(&o.restartPolicy, "restart-policy", "", "after the VM stopped without being asked (host reboot, crash): on-failure (start it again; default) or never")
	cmd.RegisterFlagCompletionFunc("on-host-failure", cobra.FixedCompletions(hostFailurePolicies.names(), cobra.ShellCompDirectiveNoFileComp))
	cmd.RegisterFlagCompletionFunc("restart-policy", cobra.FixedCompletions(restartPolicies.names(), cobra.ShellCompDirectiveNoFileComp))
	o.guest.add(cmd)
}

func (a *app) buildCreateRequest(cmd *cobra.Command, name string, o *vmCreateOptions) (*minicloudv1.CreateVMRequest, error) {
	if err := requireFlags(cmd, "image", "flavor"); err != nil {
		return nil, err
	}
	if o.timeout <= 0 {
		return nil, usagef("--timeout must be positive")
	}
	var keys []string
	for _, path := range o.sshKeyFiles {
		k, err := readSSHKeys(path)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k...)
	}
	labels, metadata, err := o.guest.parse()
	if err != nil {
		return nil, err
	}
	onHostFailure, err := hostFailurePolicies.parse("--on-host-failure", o.onHostFailure)
	if err != nil {
		return nil, err
	}
	restartPolicy, err := restartPolicies.parse("--restart-policy", o.restartPolicy)
	if err != nil {
		return nil, err
	}
	var userData []byte
	if cmd.Flags().Changed("user-data") {
		var err error
		if userData, err = readUserData(o.userData, a.in); err != nil {
			return nil, err
		}
	}
	return &minicloudv1.CreateVMRequest{
		Name:    name,
		Project: a.project(),
		Spec: &minicloudv1.VMSpec{
			Image:            o.image,
			Flavor:           o.flavor,
			Networks:         o.networks,
			SshPublicKeys:    keys,
			ConfigDrive:      o.configDrive,
			AvailabilityZone: o.az,
			ServerGroup:      o.serverGroup,
			Tags:             o.guest.tags,
			Metadata:         metadata,
			OnHostFailure:    minicloudv1.HostFailurePolicy(onHostFailure),
			RestartPolicy:    minicloudv1.RestartPolicy(restartPolicy),
		},
		Labels:    labels,
		UserData:  userData,
		RequestId: uuid.NewString(),
	}, nil
}

// readUserData reads --user-data: "-" is stdin, "@path" and "path" a file.
func readUserData(arg string, stdin io.Reader) ([]byte, error) {
	switch {
	case arg == "-":
		b, err := io.ReadAll(stdin)
		if err != nil {
			return nil, fmt.Errorf("read user-data from stdin: %w", err)
		}
		return b, nil
	case arg == "" || arg == "@":
		return nil, usagef("--user-data needs a file name, @file or -")
	}
	path := strings.TrimPrefix(arg, "@")
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("--user-data: %v", err)
	}
	return b, nil
}

// readSSHKeys returns the non-empty, non-comment lines of an
// authorized_keys-style file. The server checks that each one parses.
func readSSHKeys(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("--ssh-key: %v", err)
	}
	var keys []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		keys = append(keys, line)
	}
	if err := sc.Err(); err != nil {
		return nil, usagef("--ssh-key %s: %v", path, err)
	}
	if len(keys) == 0 {
		return nil, usagef("--ssh-key %s: no keys in the file", path)
	}
	return keys, nil
}

// createWithRetry sends CreateVM and retries while the API is unavailable.
// The request id stays the same, so a create that did happen before the
// connection broke is returned instead of made twice.
func createWithRetry(ctx context.Context, c *client.Client, req *minicloudv1.CreateVMRequest, log io.Writer) (*minicloudv1.VM, error) {
	backoff := 200 * time.Millisecond
	for {
		vm, err := c.VMs.CreateVM(ctx, req)
		if err == nil || !errdefs.IsUnavailable(err) {
			return vm, err
		}
		fmt.Fprintf(log, "minicloud: API unavailable, retrying create of vm %s (request id %s)\n", req.GetName(), req.GetRequestId())
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (a *app) newVMListCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "list", Short: "List VMs", Args: noArgs}
	all := cmd.Flags().Bool("all-projects", false, "list the VMs of every project")
	host := cmd.Flags().String("host", "", "only VMs on this host")
	phase := cmd.Flags().String("phase", "", "only VMs in this phase (e.g. running, error)")
	selector := cmd.Flags().StringP("selector", "l", "", "only VMs whose labels match: key=value, key!=value, key, !key, comma-separated")
	limit := cmd.Flags().Int("limit", 0, "list at most this many VMs (0: all; the list is fetched in pages of up to 1000)")
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		req := &minicloudv1.ListVMsRequest{Project: a.project(), AllProjects: *all, Host: *host, LabelSelector: *selector}
		if *phase != "" {
			p, ok := minicloudv1.VMPhase_value["VM_PHASE_"+strings.ToUpper(*phase)]
			if !ok {
				return usagef("--phase %q is not a VM phase (pending, scheduled, creating, running, stopped, error, deleting)", *phase)
			}
			req.Phase = minicloudv1.VMPhase(p)
		}
		if *limit < 0 {
			return usagef("--limit %d: give a positive number, or 0 for all", *limit)
		}
		if *limit > 0 {
			req.PageSize = int32(min(*limit, 1000))
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := client.ListAll(cmd.Context(), req, c.VMs.ListVMs, *limit)
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, resp, func(w io.Writer) error { return vmTable(w, resp.GetVms(), *all) })
	}
	return cmd
}

func (a *app) newVMShowCommand(complete cobra.CompletionFunc) *cobra.Command {
	return showCommand(a, "Show a VM: spec, phase, addresses, conditions", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.VM, error) {
			return c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: name, Project: a.project()})
		}, vmDetails)
}

func (a *app) newVMDeleteCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{Use: "delete NAME [--force]", Short: "Delete a VM", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	wait := cmd.Flags().Bool("wait", false, "wait until the host has cleaned up and the VM is gone")
	timeout := cmd.Flags().Duration("timeout", defaultWaitTimeout, "how long --wait may take")
	force := cmd.Flags().Bool("force", false, "remove a VM whose host is fenced (or deleted) now, without the host: its addresses and capacity are released at once, and the host destroys what is left if it comes back (admin)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		vm, err := c.VMs.DeleteVM(cmd.Context(), &minicloudv1.DeleteVMRequest{Name: args[0], Project: a.project(), Force: *force})
		if err != nil {
			return err
		}
		if host := vm.GetStatus().GetHost(); *force && host != "" {
			fmt.Fprintf(a.out, "vm %s deleted without its host %s (its addresses and capacity are free; %s destroys what is left of it if it comes back)\n", args[0], host, host)
			return nil
		}
		if !*wait {
			fmt.Fprintf(a.out, "vm %s deleting\n", args[0])
			return nil
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), *timeout)
		defer cancel()
		if _, err := a.waitVM(ctx, c, vm, waitDeleted, *timeout); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "vm %s deleted\n", args[0])
		return nil
	}
	return cmd
}

type vmAction func(ctx context.Context, in *minicloudv1.VMActionRequest, opts ...grpc.CallOption) (*minicloudv1.VM, error)

func (a *app) newVMActionCommand(verb, short string, complete cobra.CompletionFunc, action func(*client.Client) vmAction) *cobra.Command {
	return nameCommand(a, verb, short, "vm", verb+" requested", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(action(c)(ctx, &minicloudv1.VMActionRequest{Name: name, Project: a.project()}))
		})
}

func (a *app) newVMConsoleLogCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{Use: "console-log NAME", Short: "Print the VM's serial console output", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	tail := cmd.Flags().Int64("tail-bytes", 0, "only the last N bytes (default: the server's, 64 KiB)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.VMs.GetConsoleLog(cmd.Context(), &minicloudv1.GetConsoleLogRequest{Name: args[0], Project: a.project(), TailBytes: *tail})
		if err != nil {
			return err
		}
		if resp.GetTruncated() {
			fmt.Fprintf(a.errOut, "(console log truncated: the last %s follow; see --tail-bytes)\n", bytesIEC(int64(len(resp.GetData()))))
		}
		_, err = a.out.Write(resp.GetData())
		return err
	}
	return cmd
}

func (a *app) newVMEventsCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{Use: "events NAME", Short: "List what happened to a VM, and why", Args: exactArgs("NAME"), ValidArgsFunction: complete}
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.VMs.ListVMEvents(cmd.Context(), &minicloudv1.ListVMEventsRequest{Name: args[0], Project: a.project()})
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, resp, func(w io.Writer) error {
			if n := resp.GetEventsDropped(); n > 0 {
				fmt.Fprintf(a.errOut, "(%d older events were dropped: a VM keeps its last %d)\n", n, len(resp.GetEvents()))
			}
			return eventTable(w, resp.GetEvents())
		})
	}
	return cmd
}

func (a *app) newVMWaitCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "wait NAME --for running|ready|stopped|deleted",
		Short: "Wait until a VM is running, ready (guest up), stopped or deleted",
		Long: `Wait until a VM reaches a state, printing its phase changes on stderr.

  running  the VM's phase is RUNNING
  ready    the GuestReady condition is true (the guest fetched its metadata)
  stopped  the VM's phase is STOPPED
  deleted  the VM is gone

Fails (exit 1) if the VM goes to ERROR (or is deleted) while waiting for
anything but deleted,
and with exit 6 when --timeout runs out.`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	var target waitTarget
	cmd.Flags().Var(&target, "for", "running, ready, stopped or deleted")
	cmd.RegisterFlagCompletionFunc("for", cobra.FixedCompletions([]string{"running", "ready", "stopped", "deleted"}, cobra.ShellCompDirectiveNoFileComp))
	timeout := cmd.Flags().Duration("timeout", defaultWaitTimeout, "give up after this long")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "for"); err != nil {
			return err
		}
		if *timeout <= 0 {
			return usagef("--timeout must be positive")
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), *timeout)
		defer cancel()
		vm, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: args[0], Project: a.project()})
		if errdefs.IsNotFound(err) && target == waitDeleted {
			fmt.Fprintf(a.out, "vm %s deleted\n", args[0])
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := a.waitVM(ctx, c, vm, target, *timeout); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "vm %s %s\n", args[0], target)
		return nil
	}
	return cmd
}
