package lab

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// PrintStatus writes the lab's processes and, if the API answers, its
// hosts and VMs.
func (l *Lab) PrintStatus(ctx context.Context, w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROCESS\tPID\tWHERE\tLOG")
	procs := l.controlProcs()
	for _, h := range l.HostNames() {
		procs = append(procs, l.hostProcs(h)...)
	}
	for _, p := range procs {
		pid, ok := l.running(p.Name)
		state := fmt.Sprint(pid)
		if !ok {
			state = "stopped"
		}
		where := "machine"
		if p.Host != "" {
			where = fmt.Sprintf("%s (%s)", p.Host, l.HostAddr(p.Host))
			if l.partitioned(p.Host) {
				where += " PARTITIONED"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, state, where, l.LogFile(p.Name))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	c, err := l.Client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	hosts, err := c.Hosts.ListHosts(cctx, &minicloudv1.ListHostsRequest{})
	if err != nil {
		fmt.Fprintf(w, "\nAPI %s: %v\n", l.ClientEndpoint(), err)
		return nil
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tSTATE\tADDRESS\tVCPUS\tMEMORY MiB\tDISK GiB\tHYPERVISORS")
	for _, h := range hosts.Hosts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%v\n", h.GetMeta().GetName(), h.State, h.Address,
			h.GetCapacity().GetVcpus(), h.GetCapacity().GetMemoryMib(), h.GetCapacity().GetDiskGib(), h.Hypervisors)
	}
	vms, err := c.VMs.ListVMs(cctx, &minicloudv1.ListVMsRequest{})
	if err == nil && len(vms.Vms) > 0 {
		fmt.Fprintln(tw, "\nVM\tPHASE\tHOST\t\t\t\t")
		for _, v := range vms.Vms {
			fmt.Fprintf(tw, "%s\t%s\t%s\t\t\t\t\n", v.GetMeta().GetName(), v.GetStatus().GetPhase(), v.GetStatus().GetHost())
		}
	}
	return tw.Flush()
}
