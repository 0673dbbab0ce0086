package webui

import (
	"fmt"
	"strings"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// statsEvery is how often an open VM page samples GetVMStats; statsKept
// how many rates its charts show (5 minutes).
const (
	statsEvery = 5 * time.Second
	statsKept  = 60
)

// statsSeries keeps one open VM page's recent samples and turns the
// cumulative counters GetVMStats returns into rates. It lives as long as
// the page's stream: the console keeps no history of its own.
type statsSeries struct {
	prev *minicloudv1.VMStats
	// cpu is CPU use in percent of the VM's vCPUs; mem its QEMU
	// process's resident MiB; net and disk bytes per second, both ways.
	cpu, mem, net, disk []float64
}

// add folds in a sample. A sample of a restarted domain (counters went
// back) starts the rates over.
func (s *statsSeries) add(st *minicloudv1.VMStats) {
	prev := s.prev
	s.prev = st
	if prev == nil || !st.GetTime().AsTime().After(prev.GetTime().AsTime()) || st.GetCpuTimeNs() < prev.GetCpuTimeNs() {
		return
	}
	secs := st.GetTime().AsTime().Sub(prev.GetTime().AsTime()).Seconds()
	vcpus := float64(max(st.GetVcpus(), 1))
	push := func(series *[]float64, v float64) {
		*series = append(*series, max(v, 0))
		if len(*series) > statsKept {
			*series = (*series)[1:]
		}
	}
	push(&s.cpu, float64(st.GetCpuTimeNs()-prev.GetCpuTimeNs())/1e9/secs/vcpus*100)
	push(&s.mem, float64(st.GetMemoryRssKib())/1024)
	push(&s.net, float64(netBytes(st)-netBytes(prev))/secs)
	push(&s.disk, float64(diskBytes(st)-diskBytes(prev))/secs)
}

func netBytes(st *minicloudv1.VMStats) (n uint64) {
	for _, i := range st.GetInterfaces() {
		n += i.GetRxBytes() + i.GetTxBytes()
	}
	return n
}

func diskBytes(st *minicloudv1.VMStats) (n uint64) {
	for _, d := range st.GetDisks() {
		n += d.GetReadBytes() + d.GetWriteBytes()
	}
	return n
}

// chart is one sparkline as the template draws it.
type chart struct {
	Title, Last string
	// Points is the SVG polyline's points, in a 120x30 box.
	Points string
}

// Sparkline size (the SVG's viewBox).
const sparkW, sparkH = 120.0, 30.0

// charts are the series as sparklines; none before two samples.
func (s *statsSeries) charts() []chart {
	if len(s.cpu) == 0 {
		return nil
	}
	return []chart{
		{Title: "CPU", Last: fmt.Sprintf("%.1f %%", last(s.cpu)), Points: points(s.cpu, 100)},
		{Title: "Memory (RSS)", Last: fmt.Sprintf("%.0f MiB", last(s.mem)), Points: points(s.mem, 0)},
		{Title: "Network", Last: rate(last(s.net)), Points: points(s.net, 0)},
		{Title: "Disk", Last: rate(last(s.disk)), Points: points(s.disk, 0)},
	}
}

func last(v []float64) float64 { return v[len(v)-1] }

// points scales v into the sparkline box, top being ceiling (0: the
// series' own largest value). The x axis is fixed to statsKept samples,
// so a young series grows from the left.
func points(v []float64, ceiling float64) string {
	top := ceiling
	if top == 0 {
		for _, x := range v {
			top = max(top, x)
		}
	}
	if top == 0 {
		top = 1
	}
	var b strings.Builder
	step := sparkW / float64(statsKept-1)
	for i, x := range v {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%.1f,%.1f", float64(i)*step, sparkH-min(x/top, 1)*sparkH)
	}
	return b.String()
}

// rate is bytes per second for people.
func rate(bps float64) string {
	switch {
	case bps >= 1<<20:
		return fmt.Sprintf("%.1f MiB/s", bps/(1<<20))
	case bps >= 1<<10:
		return fmt.Sprintf("%.1f KiB/s", bps/(1<<10))
	}
	return fmt.Sprintf("%.0f B/s", bps)
}
