package libvirt

import (
	"context"
	"strconv"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// statsGroups are the groups of virDomainListGetStats a sample asks for:
// one call instead of a call per counter kind and device.
const statsGroups = golibvirt.DomainStatsState | golibvirt.DomainStatsCPUTotal | golibvirt.DomainStatsBalloon |
	golibvirt.DomainStatsVCPU | golibvirt.DomainStatsInterface | golibvirt.DomainStatsBlock

// Stats implements hypervisor.Driver with virDomainListGetStats.
func (d *Driver) Stats(ctx context.Context, vmID string) (hypervisor.DomainStats, error) {
	l, dom, _, err := d.lookup(ctx, vmID)
	if err != nil {
		return hypervisor.DomainStats{}, err
	}
	recs, err := l.ConnectGetAllDomainStats([]golibvirt.Domain{dom}, uint32(statsGroups), 0)
	now := time.Now()
	if err != nil {
		return hypervisor.DomainStats{}, classify(err, "stats of %s", vmID)
	}
	if len(recs) != 1 {
		return hypervisor.DomainStats{}, errdefs.NotFound("stats of %s: libvirt returned %d records", vmID, len(recs))
	}
	p := paramsOf(recs[0].Params)
	if s := golibvirt.DomainState(p.uint("state.state")); s != golibvirt.DomainRunning && s != golibvirt.DomainBlocked && s != golibvirt.DomainPaused {
		st, _ := translateState(s, 0)
		return hypervisor.DomainStats{}, errdefs.FailedPrecondition("domain of %s is %s: only a running guest has counters", vmID, st)
	}
	st := hypervisor.DomainStats{
		Time:               now,
		CPUTimeNs:          p.uint("cpu.time"),
		VCPUs:              int(p.uint("vcpu.current")),
		MemoryActualKiB:    p.uint("balloon.current"),
		MemoryRSSKiB:       p.uint("balloon.rss"),
		MemoryAvailableKiB: p.uint("balloon.available"),
		MemoryUnusedKiB:    p.uint("balloon.unused"),
	}
	for i := range int(p.uint("block.count")) {
		k := "block." + strconv.Itoa(i) + "."
		st.Disks = append(st.Disks, hypervisor.DiskStats{
			Device:     p.str(k + "name"),
			ReadBytes:  p.uint(k + "rd.bytes"),
			ReadOps:    p.uint(k + "rd.reqs"),
			WriteBytes: p.uint(k + "wr.bytes"),
			WriteOps:   p.uint(k + "wr.reqs"),
		})
	}
	for i := range int(p.uint("net.count")) {
		k := "net." + strconv.Itoa(i) + "."
		st.Interfaces = append(st.Interfaces, hypervisor.InterfaceStats{
			Device:    p.str(k + "name"),
			RxBytes:   p.uint(k + "rx.bytes"),
			RxPackets: p.uint(k + "rx.pkts"),
			RxDrops:   p.uint(k + "rx.drop"),
			RxErrors:  p.uint(k + "rx.errs"),
			TxBytes:   p.uint(k + "tx.bytes"),
			TxPackets: p.uint(k + "tx.pkts"),
			TxDrops:   p.uint(k + "tx.drop"),
			TxErrors:  p.uint(k + "tx.errs"),
		})
	}
	return st, nil
}

// params indexes typed parameters by name; a missing or negative counter
// reads as 0 (libvirt leaves out what it cannot measure).
type params map[string]any

func paramsOf(tp []golibvirt.TypedParam) params {
	m := make(params, len(tp))
	for _, p := range tp {
		m[p.Field] = p.Value.I
	}
	return m
}

func (p params) uint(name string) uint64 {
	switch v := p[name].(type) {
	case uint64:
		return v
	case uint32:
		return uint64(v)
	case int64:
		return uint64(max(v, 0))
	case int32:
		return uint64(max(v, 0))
	case float64:
		return uint64(max(v, 0))
	}
	return 0
}

func (p params) str(name string) string {
	s, _ := p[name].(string)
	return s
}
