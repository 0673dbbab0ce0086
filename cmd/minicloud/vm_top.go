package main

import (
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func (a *app) newVMTopCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "top NAME",
		Short: "Show a VM's CPU, memory, disk and network use, refreshed",
		Long: `Show a running VM's resource use as its hypervisor measures it: CPU,
memory, and per disk and per NIC the bytes, operations and packets per
second, computed from two samples (--interval apart). --once prints one
sample's cumulative counters instead; -o json/yaml prints the raw samples
(counters and the time of each), for a program to compute its own rates.`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	out := addOutputFlag(cmd)
	once := cmd.Flags().Bool("once", false, "print one sample's cumulative counters and exit")
	interval := cmd.Flags().Duration("interval", 2*time.Second, "time between samples")
	count := cmd.Flags().Int("count", 0, "stop after this many refreshes (0: until interrupted)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if *interval < 100*time.Millisecond {
			return usagef("--interval %s: at least 100ms", *interval)
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		ctx := cmd.Context()
		sample := func() (*minicloudv1.VMStats, error) {
			return c.VMs.GetVMStats(ctx, &minicloudv1.GetVMStatsRequest{Name: args[0], Project: a.project()})
		}
		prev, err := sample()
		if err != nil {
			return err
		}
		if *once || *out != formatTable {
			if err := printMessage(a.out, *out, prev, func(w io.Writer) error { return writeStatsTotals(w, args[0], prev) }); err != nil {
				return err
			}
			if *once {
				return nil
			}
		}
		clear := a.outIsTerminal()
		for n := 0; *count == 0 || n < *count; n++ {
			select {
			case <-ctx.Done():
				return nil // interrupted: the normal way out
			case <-time.After(*interval):
			}
			cur, err := sample()
			if err != nil {
				return err
			}
			if *out != formatTable {
				if err := printMessage(a.out, *out, cur, nil); err != nil {
					return err
				}
			} else {
				if clear {
					fmt.Fprint(a.out, "\x1b[H\x1b[2J")
				}
				if err := writeStatsRates(a.out, args[0], prev, cur); err != nil {
					return err
				}
			}
			prev = cur
		}
		return nil
	}
	return cmd
}

// outIsTerminal says whether stdout is a terminal (top redraws in place).
func (a *app) outIsTerminal() bool {
	f, ok := a.out.(interface{ Fd() uintptr })
	return ok && term.IsTerminal(int(f.Fd()))
}

// writeStatsTotals prints one sample's cumulative counters.
func writeStatsTotals(w io.Writer, name string, s *minicloudv1.VMStats) error {
	if err := writeFields(w, []field{
		{"VM", name}, {"Host", s.GetHost()}, {"Sampled", s.GetTime().AsTime().UTC().Format(time.RFC3339)},
		{"vCPUs", strconv.Itoa(int(s.GetVcpus()))},
		{"CPU time", time.Duration(s.GetCpuTimeNs()).Round(time.Millisecond).String()},
		{"Memory", memoryLine(s)},
	}); err != nil {
		return err
	}
	fmt.Fprintln(w)
	var disks [][]string
	for _, d := range s.GetDisks() {
		disks = append(disks, []string{d.GetDevice(), bytesIEC(int64(d.GetReadBytes())), strconv.FormatUint(d.GetReadOps(), 10),
			bytesIEC(int64(d.GetWriteBytes())), strconv.FormatUint(d.GetWriteOps(), 10)})
	}
	if err := writeTable(w, []string{"DISK", "READ", "READ OPS", "WRITTEN", "WRITE OPS"}, disks); err != nil {
		return err
	}
	fmt.Fprintln(w)
	var nics [][]string
	for _, n := range s.GetInterfaces() {
		nics = append(nics, []string{n.GetDevice(), bytesIEC(int64(n.GetRxBytes())), strconv.FormatUint(n.GetRxPackets(), 10),
			bytesIEC(int64(n.GetTxBytes())), strconv.FormatUint(n.GetTxPackets(), 10),
			strconv.FormatUint(n.GetRxDrops()+n.GetTxDrops(), 10)})
	}
	return writeTable(w, []string{"NIC", "RX", "RX PACKETS", "TX", "TX PACKETS", "DROPS"}, nics)
}

func memoryLine(s *minicloudv1.VMStats) string {
	line := fmt.Sprintf("%s given, %s resident on the host", bytesIEC(int64(s.GetMemoryActualKib())<<10), bytesIEC(int64(s.GetMemoryRssKib())<<10))
	if s.GetMemoryAvailableKib() > 0 {
		line += fmt.Sprintf(", %s unused in the guest", bytesIEC(int64(s.GetMemoryUnusedKib())<<10))
	}
	return line
}

// writeStatsRates prints the rates between two samples of the same VM.
// Counters restart from zero when the VM restarts; a counter that went
// down counts from zero.
func writeStatsRates(w io.Writer, name string, prev, cur *minicloudv1.VMStats) error {
	secs := cur.GetTime().AsTime().Sub(prev.GetTime().AsTime()).Seconds()
	if secs <= 0 {
		secs = 1e-9
	}
	rate := func(a, b uint64) float64 {
		if b < a {
			a = 0
		}
		return float64(b-a) / secs
	}
	cpu := rate(prev.GetCpuTimeNs(), cur.GetCpuTimeNs()) / 1e9 * 100
	if err := writeFields(w, []field{
		{"VM", name}, {"Host", cur.GetHost()}, {"Sampled", cur.GetTime().AsTime().UTC().Format(time.RFC3339)},
		{"CPU", fmt.Sprintf("%.1f%% of one vCPU (%d vCPUs)", cpu, cur.GetVcpus())},
		{"Memory", memoryLine(cur)},
	}); err != nil {
		return err
	}
	fmt.Fprintln(w)
	prevDisk := map[string]*minicloudv1.VMDiskStats{}
	for _, d := range prev.GetDisks() {
		prevDisk[d.GetDevice()] = d
	}
	var disks [][]string
	for _, d := range cur.GetDisks() {
		p := prevDisk[d.GetDevice()]
		disks = append(disks, []string{d.GetDevice(),
			perSecond(rate(p.GetReadBytes(), d.GetReadBytes())), fmt.Sprintf("%.1f", rate(p.GetReadOps(), d.GetReadOps())),
			perSecond(rate(p.GetWriteBytes(), d.GetWriteBytes())), fmt.Sprintf("%.1f", rate(p.GetWriteOps(), d.GetWriteOps()))})
	}
	if err := writeTable(w, []string{"DISK", "READ/S", "READ OPS/S", "WRITE/S", "WRITE OPS/S"}, disks); err != nil {
		return err
	}
	fmt.Fprintln(w)
	prevNIC := map[string]*minicloudv1.VMInterfaceStats{}
	for _, n := range prev.GetInterfaces() {
		prevNIC[n.GetDevice()] = n
	}
	var nics [][]string
	for _, n := range cur.GetInterfaces() {
		p := prevNIC[n.GetDevice()]
		nics = append(nics, []string{n.GetDevice(),
			perSecond(rate(p.GetRxBytes(), n.GetRxBytes())), fmt.Sprintf("%.1f", rate(p.GetRxPackets(), n.GetRxPackets())),
			perSecond(rate(p.GetTxBytes(), n.GetTxBytes())), fmt.Sprintf("%.1f", rate(p.GetTxPackets(), n.GetTxPackets())),
			fmt.Sprintf("%.1f", rate(p.GetRxDrops()+p.GetTxDrops(), n.GetRxDrops()+n.GetTxDrops()))})
	}
	return writeTable(w, []string{"NIC", "RX/S", "RX PKTS/S", "TX/S", "TX PKTS/S", "DROPS/S"}, nics)
}

func perSecond(v float64) string { return bytesIEC(int64(v)) + "/s" }
