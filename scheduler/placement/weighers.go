package placement

import (
	"fmt"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// Weigher scores a feasible host; higher is better. Raw scores are
// normalised to [0, 1] over the candidates of one decision (as Nova does), so
// that multipliers, not units, say how much each weigher counts.
type Weigher interface {
	Name() string
	Weigh(c *Cluster, req *Request, h *Host) float64
}

// Weighted is a weigher with its multiplier. A negative multiplier inverts
// the preference (FreeMemory with -1 packs instead of spreading).
type Weighted struct {
	Weigher    Weigher
	Multiplier float64
}

// Strategy selects how VMs are distributed over hosts.
type Strategy string

const (
	// Spread prefers the host with the most free memory (the default):
	// fewer noisy neighbours, and a host failure takes fewer VMs with it.
	Spread Strategy = "spread"
	// Pack prefers the host with the least free memory, keeping whole
	// hosts empty for large flavors or for powering off.
	Pack Strategy = "pack"
)

// Default multipliers. The group weighers outweigh the memory weigher so
// that a soft policy wins over spread/pack whenever it can be honoured.
const (
	DefaultMemoryMultiplier           = 1.0
	DefaultSoftAffinityMultiplier     = 2.0
	DefaultSoftAntiAffinityMultiplier = 2.0
)

// DefaultWeighers returns the weighers for a strategy.
func DefaultWeighers(s Strategy) ([]Weighted, error) {
	mem := DefaultMemoryMultiplier
	switch s {
	case Spread, "":
	case Pack:
		mem = -mem
	default:
		return nil, fmt.Errorf("unknown weigher strategy %q: want spread or pack", s)
	}
	return []Weighted{
		{FreeMemory{}, mem},
		{SoftAffinity{}, DefaultSoftAffinityMultiplier},
		{SoftAntiAffinity{}, DefaultSoftAntiAffinityMultiplier},
	}, nil
}

// FreeMemory weighs a host by the memory left under its RAM ratio.
type FreeMemory struct{}

func (FreeMemory) Name() string { return "FreeMemory" }
func (FreeMemory) Weigh(_ *Cluster, _ *Request, h *Host) float64 {
	return float64(h.Free().MemoryMiB)
}

// SoftAffinity prefers hosts that already hold members of the VM's
// soft-affinity group, more members more so.
type SoftAffinity struct{}

func (SoftAffinity) Name() string { return "SoftAffinity" }
func (SoftAffinity) Weigh(c *Cluster, req *Request, h *Host) float64 {
	if req.Policy != minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_AFFINITY || req.Group == "" {
		return 0
	}
	return float64(c.Groups[req.Group][h.Name])
}

// SoftAntiAffinity prefers hosts with fewer members of the VM's
// soft-anti-affinity group.
type SoftAntiAffinity struct{}

func (SoftAntiAffinity) Name() string { return "SoftAntiAffinity" }
func (SoftAntiAffinity) Weigh(c *Cluster, req *Request, h *Host) float64 {
	if req.Policy != minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_ANTI_AFFINITY || req.Group == "" {
		return 0
	}
	return -float64(c.Groups[req.Group][h.Name])
}
