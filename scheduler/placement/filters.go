package placement

import (
	"slices"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// Filter removes hosts that cannot take a request. Feasible must be cheap
// (it runs for up to every host of the cluster per decision) and must not
// modify anything. When a host is refused, why may name the detail
// ("memory", "disabled") that the NoValidHost message counts.
type Filter interface {
	Name() string
	Feasible(c *Cluster, req *Request, h *Host) (ok bool, why string)
}

// DefaultFilters is the chain in the order it runs: cheap and most
// selective first, capacity last (its arithmetic is the costliest).
func DefaultFilters() []Filter {
	return []Filter{
		TargetHost{}, ExcludeTriedHosts{}, HostUp{},
		AvailabilityZone{}, Hypervisor{}, ServerGroup{}, Capacity{},
	}
}

// HostUp keeps hosts whose heartbeat lease lives and that are not disabled.
type HostUp struct{}

func (HostUp) Name() string { return "HostUp" }
func (HostUp) Feasible(_ *Cluster, _ *Request, h *Host) (bool, string) {
	switch {
	case !h.Up:
		return false, "down"
	case h.Disabled:
		return false, "disabled"
	}
	return true, ""
}

// Capacity keeps hosts with room for the request's vCPUs, memory and disk
// under the host's allocation ratios. A host that would have room but for
// this replica's uncommitted placements (Host.Pending) is refused with
// WhyPending: that is not a property of the host, and a request refused
// only so is retried once they commit (NoValidHostError.Retryable).
type Capacity struct{}

// WhyPending is Capacity's reason for a host that is full only with this
// replica's placements still being committed.
const WhyPending = "pending placements"

func (Capacity) Name() string { return "Capacity" }
func (Capacity) Feasible(_ *Cluster, req *Request, h *Host) (bool, string) {
	f := h.Free()
	if req.Resources.Fits(f) {
		return true, ""
	}
	if h.Pending != (Resources{}) && req.Resources.Fits(f.Add(h.Pending)) {
		return false, WhyPending
	}
	switch {
	case req.Resources.MemoryMiB > f.MemoryMiB:
		return false, "memory"
	case req.Resources.VCPUs > f.VCPUs:
		return false, "vcpus"
	case req.Resources.DiskGiB > f.DiskGiB:
		return false, "disk"
	}
	return true, ""
}

// AvailabilityZone keeps hosts in the requested zone (any host if none is
// requested).
type AvailabilityZone struct{}

func (AvailabilityZone) Name() string { return "AvailabilityZone" }
func (AvailabilityZone) Feasible(_ *Cluster, req *Request, h *Host) (bool, string) {
	return req.Zone == "" || req.Zone == h.Zone, ""
}

// Hypervisor keeps hosts that can run the hypervisor the image needs.
type Hypervisor struct{}

func (Hypervisor) Name() string { return "Hypervisor" }
func (Hypervisor) Feasible(_ *Cluster, req *Request, h *Host) (bool, string) {
	return req.Hypervisor == "" || h.HasHypervisor(req.Hypervisor), ""
}

// TargetHost keeps only the host an administrator pinned the VM to.
type TargetHost struct{}

func (TargetHost) Name() string { return "TargetHost" }
func (TargetHost) Feasible(_ *Cluster, req *Request, h *Host) (bool, string) {
	return req.TargetHost == "" || req.TargetHost == h.Name, ""
}

// ExcludeTriedHosts removes hosts on which this VM already failed to start,
// so a reschedule goes elsewhere.
type ExcludeTriedHosts struct{}

func (ExcludeTriedHosts) Name() string { return "ExcludeTriedHosts" }
func (ExcludeTriedHosts) Feasible(_ *Cluster, req *Request, h *Host) (bool, string) {
	return !slices.Contains(req.TriedHosts, h.Name), ""
}

// ServerGroup enforces hard affinity (every member on the host that already
// holds members; any host for the first one) and hard anti-affinity (at most
// one member per host). Soft policies are weighers, not filters.
type ServerGroup struct{}

func (ServerGroup) Name() string { return "ServerGroup" }
func (ServerGroup) Feasible(c *Cluster, req *Request, h *Host) (bool, string) {
	if req.Group == "" {
		return true, ""
	}
	members := c.Groups[req.Group]
	switch req.Policy {
	case minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY:
		if len(members) > 0 && members[h.Name] == 0 {
			return false, "affinity"
		}
	case minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_ANTI_AFFINITY:
		if members[h.Name] > 0 {
			return false, "anti-affinity"
		}
	}
	return true, ""
}
