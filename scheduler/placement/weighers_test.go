package placement

import (
	"math/rand/v2"
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func TestWeighers(t *testing.T) {
	soft := func(p minicloudv1.ServerGroupPolicy) *Request { return &Request{Group: "p/g", Policy: p} }
	tests := []struct {
		name    string
		weigher Weigher
		req     *Request
		// want is the raw weight of h1 (4 GiB allocated, 1 member) and h2
		// (nothing allocated, no member).
		want [2]float64
	}{
		{"free memory", FreeMemory{}, &Request{}, [2]float64{4096, 8192}},
		{"soft affinity", SoftAffinity{}, soft(minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_AFFINITY), [2]float64{1, 0}},
		{"soft affinity ignores other policies", SoftAffinity{}, soft(minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_ANTI_AFFINITY), [2]float64{0, 0}},
		{"soft anti-affinity", SoftAntiAffinity{}, soft(minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_ANTI_AFFINITY), [2]float64{-1, 0}},
		{"soft anti-affinity without group", SoftAntiAffinity{}, &Request{Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_ANTI_AFFINITY}, [2]float64{0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h1, h2 := testHost("h1"), testHost("h2")
			h1.Allocated.MemoryMiB = 4096
			c := clusterOf(h1, h2)
			members("h1")(c)
			got := [2]float64{tt.weigher.Weigh(c, tt.req, h1), tt.weigher.Weigh(c, tt.req, h2)}
			if got != tt.want {
				t.Fatalf("weights = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestStrategies checks the combined, normalised ranking end to end.
func TestStrategies(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tests := []struct {
		name     string
		strategy Strategy
		req      Request
		members  map[string]int
		want     string
	}{
		{"spread prefers most free memory", Spread, Request{}, nil, "empty"},
		{"pack prefers least free memory", Pack, Request{}, nil, "full"},
		{"soft anti-affinity beats spread", Spread, Request{Group: "p/g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_ANTI_AFFINITY}, map[string]int{"full": 1, "empty": 1}, "half"},
		{"soft affinity beats spread", Spread, Request{Group: "p/g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_AFFINITY}, map[string]int{"full": 1}, "full"},
		{"soft affinity beats pack", Pack, Request{Group: "p/g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_SOFT_AFFINITY}, map[string]int{"empty": 1}, "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			full, half, empty := testHost("full"), testHost("half"), testHost("empty")
			full.Allocated.MemoryMiB, half.Allocated.MemoryMiB = 6144, 4096
			c := clusterOf(full, half, empty)
			if tt.members != nil {
				c.Groups["p/g"] = tt.members
			}
			p, err := NewPolicy(tt.strategy)
			if err != nil {
				t.Fatal(err)
			}
			for range 20 {
				d, err := Schedule(c, &tt.req, p, rng)
				if err != nil {
					t.Fatal(err)
				}
				if d.Host.Name != tt.want {
					t.Fatalf("chose %s, want %s", d.Host.Name, tt.want)
				}
			}
		})
	}
	if _, err := NewPolicy("balanced"); err == nil {
		t.Fatal("NewPolicy(balanced) accepted an unknown strategy")
	}
}
