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

// Host failure: fence, evacuate, and how host show tells an operator
// where a dead host stands (docs/operations.md, "When a host dies").

// fenceMargin is store.FenceMargin (a test keeps them equal; the CLI does
// not link the store): the control plane counts an unreachable host as
// fenced that long after its self-fencing delay.
const fenceMargin = 5 * time.Second

// fenceWarning is what host fence without --confirm says, before any call:
// the flag is the operator's word, so it is never defaulted.
const fenceWarning = "fencing host %[1]s tells minicloud that %[1]s runs none of its VMs any more " +
	"(it is powered off, or cut off long enough to have self-fenced); its VMs may then be rebuilt on other hosts, " +
	"and if it is in fact still running them, two copies of each VM share its addresses and each other's data is lost: " +
	"power the host off (or check it is off) and run again with --confirm"

func (a *app) newHostFenceCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "fence NAME --confirm [--reason TEXT]",
		Short: "Declare an unreachable host powered off, so its VMs may leave it",
		Long: `Declare that an UNREACHABLE host runs none of its VMs: it becomes FENCED,
and its VMs may be evacuated (` + "`minicloud host evacuate`" + `), force-deleted
(` + "`minicloud vm delete --force`" + `), or are rebuilt elsewhere at once if
they asked for it (--on-host-failure evacuate).

Only for a host you know is powered off: a host whose agent died while its
QEMU processes still run cannot fence itself. Refused for a host that is UP.
A heartbeat from the host lifts the fence.`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	confirm := cmd.Flags().Bool("confirm", false, "assert that the host runs none of its VMs (it is powered off)")
	reason := cmd.Flags().String("reason", "", "why, for the record (shown in host show)")
	callCommand(a, cmd,
		func(ctx context.Context, c *client.Client, args []string) (*minicloudv1.Host, error) {
			return c.Hosts.FenceHost(ctx, &minicloudv1.FenceHostRequest{Name: args[0], Confirm: true, Reason: *reason})
		},
		func(w io.Writer, h *minicloudv1.Host, args []string) error {
			_, err := fmt.Fprintf(w, "host %s fenced by %s: its VMs may be evacuated (`minicloud host evacuate %s`)\n", args[0], h.GetFence().GetBy(), args[0])
			return err
		})
	// The flag is the operator's word, checked before any call.
	cmd.PreRunE = func(_ *cobra.Command, args []string) error {
		if !*confirm {
			return usagef(fenceWarning, args[0])
		}
		return nil
	}
	return cmd
}

func (a *app) newHostEvacuateCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "evacuate NAME [--vm VM ...]",
		Short: "Rebuild a fenced host's VMs on other hosts (their local disks are lost)",
		Long: `Rebuild the VMs of a FENCED host (all, or those named with --vm) on other
hosts, from their images, with the same id, name, addresses and user-data.
Their local disks stay on the dead host and are lost, as with Nova's
evacuate without shared storage. VMs being deleted are removed instead.
Refused for a host that is not FENCED (see ` + "`minicloud host fence`" + `).`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	vms := cmd.Flags().StringArray("vm", nil, "only this VM, by name or id (repeatable; default: every VM of the host)")
	callCommand(a, cmd,
		func(ctx context.Context, c *client.Client, args []string) (*minicloudv1.EvacuateHostResponse, error) {
			return c.Hosts.EvacuateHost(ctx, &minicloudv1.EvacuateHostRequest{Name: args[0], VmIds: *vms})
		},
		func(w io.Writer, resp *minicloudv1.EvacuateHostResponse, args []string) error {
			return evacuated(w, args[0], resp.GetVms())
		})
	return cmd
}

// evacuated tells, for each VM, that it left host and what was lost.
func evacuated(w io.Writer, host string, vms []*minicloudv1.VM) error {
	if len(vms) == 0 {
		_, err := fmt.Fprintf(w, "host %s: no VM to evacuate\n", host)
		return err
	}
	for _, vm := range vms {
		if _, err := fmt.Fprintf(w, "vm %s (%s, project %s) evacuated from %s: rebuilt from image %s on another host with the same id, name, addresses and user-data; its local disk on %s is lost\n",
			vm.GetMeta().GetName(), vm.GetMeta().GetId(), vm.GetMeta().GetProject(), host, vm.GetSpec().GetImage(), host); err != nil {
			return err
		}
	}
	return nil
}

// selfFencing says whether the host's agent destroys its domains when it
// loses contact, and so whether time alone can fence it.
func selfFencing(h *minicloudv1.Host) string {
	f := h.GetFenceAfterSeconds()
	if f <= 0 {
		return "off (only an operator can fence this host: minicloud host fence " + h.GetMeta().GetName() + " --confirm)"
	}
	return fmt.Sprintf("after %s without contact (agent --fence-after)", time.Duration(f)*time.Second)
}

// hostFailureFields are host show's lines for a host that is not UP.
func hostFailureFields(h *minicloudv1.Host) []field {
	var fields []field
	if since := h.GetUnreachableSince(); since != nil {
		fields = append(fields, field{"Unreachable since", timestamp(since) + " (" + age(since) + " ago)"})
		if f := h.GetFenceAfterSeconds(); f > 0 && h.GetFence() == nil {
			at := since.AsTime().Add(time.Duration(f)*time.Second + fenceMargin)
			fields = append(fields, field{"Fenced by time at", at.UTC().Format(time.RFC3339) + " (unreachable since + fence-after + " + fenceMargin.String() + ")"})
		}
	}
	if fence := h.GetFence(); fence != nil {
		fields = append(fields,
			field{"Fenced", timestamp(fence.GetTime()) + " by " + orDash(fence.GetBy())},
			field{"Fence reason", orDash(fence.GetReason())})
	}
	return fields
}

// choices maps a flag's words to an enum's values; the first is the
// default, which is also what UNSPECIFIED (0) shows as.
type choices []struct {
	word  string
	value int32
}

var (
	hostFailurePolicies = choices{
		{"stop", int32(minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_STOP)},
		{"evacuate", int32(minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE)},
	}
	restartPolicies = choices{
		{"on-failure", int32(minicloudv1.RestartPolicy_RESTART_POLICY_ON_FAILURE)},
		{"never", int32(minicloudv1.RestartPolicy_RESTART_POLICY_NEVER)},
	}
)

func (cs choices) names() []string {
	names := make([]string, len(cs))
	for i, c := range cs {
		names[i] = c.word
	}
	return names
}

// parse turns a flag's word into its value; "" is 0 (the server's default).
func (cs choices) parse(flag, word string) (int32, error) {
	if word == "" {
		return 0, nil
	}
	for _, c := range cs {
		if strings.EqualFold(c.word, word) {
			return c.value, nil
		}
	}
	return 0, usagef("%s %q: choose one of %s", flag, word, strings.Join(cs.names(), ", "))
}

// name is the word for a value; 0 (a VM stored before the field existed)
// is the default's.
func (cs choices) name(value int32) string {
	if value == 0 {
		return cs[0].word
	}
	for _, c := range cs {
		if c.value == value {
			return c.word
		}
	}
	return fmt.Sprintf("unknown (%d)", value)
}
