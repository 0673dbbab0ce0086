// Package placement is the scheduler's pure decision: given a view of the
// cluster (hosts, their allocations, server-group members) and one VM's
// request, choose a host or say precisely why none fits. It does no I/O and
// holds no locks; the caller owns the Cluster for the duration of a call.
//
// The decision is a chain, as in Nova's FilterScheduler and Nomad's
// feasibility/ranking stack: filters remove hosts that cannot take the VM,
// weighers rank a bounded random sample of the ones that can, and the best
// weighted host wins with a random tie-break.
package placement

import (
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// Default allocation ratios used when a host leaves a ratio at 0 (Nova's
// historical defaults: CPUs are time-shared, memory and disk are not).
const (
	DefaultCPURatio  = 4.0
	DefaultRAMRatio  = 1.0
	DefaultDiskRatio = 1.0
)

// Resources is an amount of the three resources a VM claims.
type Resources struct {
	VCPUs     int64
	MemoryMiB int64
	DiskGiB   int64
}

// Add returns r + o.
func (r Resources) Add(o Resources) Resources {
	return Resources{r.VCPUs + o.VCPUs, r.MemoryMiB + o.MemoryMiB, r.DiskGiB + o.DiskGiB}
}

// Sub returns r - o.
func (r Resources) Sub(o Resources) Resources {
	return Resources{r.VCPUs - o.VCPUs, r.MemoryMiB - o.MemoryMiB, r.DiskGiB - o.DiskGiB}
}

// Fits reports whether r fits in free.
func (r Resources) Fits(free Resources) bool {
	return r.VCPUs <= free.VCPUs && r.MemoryMiB <= free.MemoryMiB && r.DiskGiB <= free.DiskGiB
}

// ResourcesFromProto converts the API's Resources (nil is zero).
func ResourcesFromProto(p *minicloudv1.Resources) Resources {
	if p == nil {
		return Resources{}
	}
	return Resources{VCPUs: int64(p.GetVcpus()), MemoryMiB: p.GetMemoryMib(), DiskGiB: p.GetDiskGib()}
}

// Ratios are a host's overcommit factors.
type Ratios struct {
	CPU, RAM, Disk float64
}

// RatiosFromProto applies the defaults to ratios left at 0 (or negative).
func RatiosFromProto(p *minicloudv1.AllocationRatios) Ratios {
	r := Ratios{CPU: p.GetCpu(), RAM: p.GetRam(), Disk: p.GetDisk()}
	if r.CPU <= 0 {
		r.CPU = DefaultCPURatio
	}
	if r.RAM <= 0 {
		r.RAM = DefaultRAMRatio
	}
	if r.Disk <= 0 {
		r.Disk = DefaultDiskRatio
	}
	return r
}

// Host is one hypervisor as the scheduler sees it.
type Host struct {
	Name        string
	Zone        string
	Hypervisors []string
	Disabled    bool
	// Up is true while the host's heartbeat lease (hosts/alive/<name>) exists.
	Up       bool
	Capacity Resources
	Ratios   Ratios
	// Allocated is the sum of the claims on the host (hosts/alloc/<name>)
	// plus Pending.
	Allocated Resources
	VMCount   int
	// Pending is what this replica has decided to place on the host but
	// not yet committed (its group commit, scheduler/lane.go): counted in
	// Allocated so that the next decision stacks on it, and told apart so
	// that a request refused only because of it is retried, not failed.
	Pending Resources
	// Preferred marks the hosts in this replica's share (see
	// Cluster.Partitioned).
	Preferred bool
}

// Limits is what may be allocated on h: capacity times ratio, rounded down.
func (h *Host) Limits() Resources {
	return Resources{
		VCPUs:     int64(float64(h.Capacity.VCPUs) * h.Ratios.CPU),
		MemoryMiB: int64(float64(h.Capacity.MemoryMiB) * h.Ratios.RAM),
		DiskGiB:   int64(float64(h.Capacity.DiskGiB) * h.Ratios.Disk),
	}
}

// Free is Limits minus Allocated (negative if an operator lowered a ratio
// below what is already allocated).
func (h *Host) Free() Resources {
	l := h.Limits()
	return Resources{l.VCPUs - h.Allocated.VCPUs, l.MemoryMiB - h.Allocated.MemoryMiB, l.DiskGiB - h.Allocated.DiskGiB}
}

// HasHypervisor reports whether h can run guests with hypervisor hv.
func (h *Host) HasHypervisor(hv string) bool {
	for _, x := range h.Hypervisors {
		if x == hv {
			return true
		}
	}
	return false
}

// Cluster is the state a decision reads. Hosts is the iteration order;
// ByName indexes the same pointers.
type Cluster struct {
	Hosts  []*Host
	ByName map[string]*Host
	// Groups maps a server group (GroupKey) to the hosts holding its members
	// and how many members each holds, from the claims.
	Groups map[string]map[string]int
	// Partitioned says that the replicas split the hosts between them
	// (see scheduler/members.go): a decision searches the hosts marked
	// Preferred first, so that replicas rarely race for the same host, and
	// the others only when none of those fits — so it never causes a
	// NoValidHost.
	Partitioned bool
}

// NewCluster returns an empty cluster.
func NewCluster() *Cluster {
	return &Cluster{ByName: map[string]*Host{}, Groups: map[string]map[string]int{}}
}

// GroupKey names a server group across projects.
func GroupKey(project, name string) string { return project + "/" + name }

// Request is what one VM asks for.
type Request struct {
	VMID       string
	Resources  Resources
	Zone       string
	Hypervisor string
	TargetHost string
	// Group is the GroupKey of the VM's server group ("" for none) and
	// Policy that group's policy.
	Group      string
	Policy     minicloudv1.ServerGroupPolicy
	TriedHosts []string
}
