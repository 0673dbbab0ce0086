package placement

import (
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func testHost(name string) *Host {
	return &Host{
		Name: name, Zone: "az1", Hypervisors: []string{"tcg"}, Up: true,
		Capacity: Resources{VCPUs: 4, MemoryMiB: 8192, DiskGiB: 100},
		Ratios:   Ratios{CPU: DefaultCPURatio, RAM: DefaultRAMRatio, Disk: DefaultDiskRatio},
	}
}

func clusterOf(hosts ...*Host) *Cluster {
	c := NewCluster()
	for _, h := range hosts {
		c.Hosts = append(c.Hosts, h)
		c.ByName[h.Name] = h
	}
	return c
}

func TestFilters(t *testing.T) {
	small := Resources{VCPUs: 1, MemoryMiB: 1024, DiskGiB: 10}
	tests := []struct {
		name    string
		filter  Filter
		host    func(h *Host)
		cluster func(c *Cluster)
		req     Request
		ok      bool
		why     string
	}{
		{name: "up", filter: HostUp{}, ok: true},
		{name: "down", filter: HostUp{}, host: func(h *Host) { h.Up = false }, why: "down"},
		{name: "disabled", filter: HostUp{}, host: func(h *Host) { h.Disabled = true }, why: "disabled"},

		{name: "fits exactly", filter: Capacity{}, req: Request{Resources: Resources{VCPUs: 16, MemoryMiB: 8192, DiskGiB: 100}}, ok: true},
		{name: "memory over ratio 1.0", filter: Capacity{}, req: Request{Resources: Resources{MemoryMiB: 8193}}, why: "memory"},
		{name: "memory under ratio 1.5", filter: Capacity{}, host: func(h *Host) { h.Ratios.RAM = 1.5 }, req: Request{Resources: Resources{MemoryMiB: 12288}}, ok: true},
		{name: "vcpus over ratio 4", filter: Capacity{}, req: Request{Resources: Resources{VCPUs: 17}}, why: "vcpus"},
		{name: "vcpus with ratio 1", filter: Capacity{}, host: func(h *Host) { h.Ratios.CPU = 1 }, req: Request{Resources: Resources{VCPUs: 5}}, why: "vcpus"},
		{name: "disk", filter: Capacity{}, req: Request{Resources: Resources{DiskGiB: 101}}, why: "disk"},
		{name: "allocated counts", filter: Capacity{}, host: func(h *Host) { h.Allocated = Resources{VCPUs: 1, MemoryMiB: 7680, DiskGiB: 1} }, req: Request{Resources: small}, why: "memory"},
		{name: "allocated leaves room", filter: Capacity{}, host: func(h *Host) { h.Allocated = Resources{VCPUs: 15, MemoryMiB: 7168, DiskGiB: 90} }, req: Request{Resources: small}, ok: true},

		{name: "no zone asked", filter: AvailabilityZone{}, ok: true},
		{name: "same zone", filter: AvailabilityZone{}, req: Request{Zone: "az1"}, ok: true},
		{name: "other zone", filter: AvailabilityZone{}, req: Request{Zone: "az2"}},

		{name: "any hypervisor", filter: Hypervisor{}, ok: true},
		{name: "tcg on tcg host", filter: Hypervisor{}, req: Request{Hypervisor: "tcg"}, ok: true},
		{name: "kvm on tcg host", filter: Hypervisor{}, req: Request{Hypervisor: "kvm"}},

		{name: "no target", filter: TargetHost{}, ok: true},
		{name: "target is this host", filter: TargetHost{}, req: Request{TargetHost: "h1"}, ok: true},
		{name: "target elsewhere", filter: TargetHost{}, req: Request{TargetHost: "h2"}},

		{name: "not tried", filter: ExcludeTriedHosts{}, req: Request{TriedHosts: []string{"h2"}}, ok: true},
		{name: "tried", filter: ExcludeTriedHosts{}, req: Request{TriedHosts: []string{"h2", "h1"}}},

		{name: "full only with pending placements", filter: Capacity{}, req: Request{Resources: small},
			host: func(h *Host) { h.Pending = Resources{MemoryMiB: 2048}; h.Allocated = Resources{MemoryMiB: 8192} }, why: WhyPending},
		{name: "full with or without pending placements", filter: Capacity{}, req: Request{Resources: small},
			host: func(h *Host) { h.Pending = Resources{MemoryMiB: 512}; h.Allocated = Resources{MemoryMiB: 8192} }, why: "memory"},

		{name: "no group", filter: ServerGroup{}, ok: true},
		{name: "affinity, empty group", filter: ServerGroup{}, req: affinity(), ok: true},
		{name: "affinity, members here", filter: ServerGroup{}, req: affinity(), cluster: members("h1"), ok: true},
		{name: "affinity, members elsewhere", filter: ServerGroup{}, req: affinity(), cluster: members("h2"), why: "affinity"},
		{name: "anti-affinity, empty group", filter: ServerGroup{}, req: antiAffinity(), ok: true},
		{name: "anti-affinity, member here", filter: ServerGroup{}, req: antiAffinity(), cluster: members("h1"), why: "anti-affinity"},
		{name: "anti-affinity, member elsewhere", filter: ServerGroup{}, req: antiAffinity(), cluster: members("h2"), ok: true},
		{name: "soft anti-affinity is not a filter", filter: ServerGroup{}, req: Request{Group: "p/g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_ANTI_AFFINITY}, cluster: members("h1"), ok: true},
		{name: "other group's members do not count", filter: ServerGroup{}, req: Request{Group: "p/other", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_ANTI_AFFINITY}, cluster: members("h1"), ok: true},
	}
	for _, tt := range tests {
		t.Run(tt.filter.Name()+"/"+tt.name, func(t *testing.T) {
			h := testHost("h1")
			if tt.host != nil {
				tt.host(h)
			}
			c := clusterOf(h, testHost("h2"))
			if tt.cluster != nil {
				tt.cluster(c)
			}
			ok, why := tt.filter.Feasible(c, &tt.req, h)
			if ok != tt.ok || why != tt.why {
				t.Fatalf("Feasible = %v, %q; want %v, %q", ok, why, tt.ok, tt.why)
			}
		})
	}
}

func affinity() Request {
	return Request{Group: "p/g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY}
}

func antiAffinity() Request {
	return Request{Group: "p/g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_ANTI_AFFINITY}
}

func members(hosts ...string) func(c *Cluster) {
	return func(c *Cluster) {
		g := map[string]int{}
		for _, h := range hosts {
			g[h]++
		}
		c.Groups["p/g"] = g
	}
}

func TestRatiosFromProtoDefaults(t *testing.T) {
	got := RatiosFromProto(&minicloudv1.AllocationRatios{Ram: 1.5})
	want := Ratios{CPU: DefaultCPURatio, RAM: 1.5, Disk: DefaultDiskRatio}
	if got != want {
		t.Fatalf("RatiosFromProto = %+v, want %+v", got, want)
	}
	if got := RatiosFromProto(nil); got != (Ratios{4, 1, 1}) {
		t.Fatalf("RatiosFromProto(nil) = %+v", got)
	}
}
