package placement

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

func TestNoValidHostMessage(t *testing.T) {
	var hosts []*Host
	for i := range 20 {
		h := testHost(fmt.Sprintf("h%02d", i))
		switch {
		case i < 3:
			h.Up = false
		case i < 5:
			h.Zone = "az2"
		case i < 15:
			h.Allocated.MemoryMiB = 8192
		default:
			h.Allocated.VCPUs = 16
		}
		hosts = append(hosts, h)
	}
	p, _ := NewPolicy(Spread)
	_, err := Schedule(clusterOf(hosts...), &Request{Zone: "az1", Resources: Resources{VCPUs: 1, MemoryMiB: 512}}, p, rand.New(rand.NewPCG(1, 1)))
	want := "no valid host: 20 hosts; HostUp removed 3 (down), AvailabilityZone removed 2, Capacity removed 15 (memory 10, vcpus 5)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant  %s", err, want)
	}
	if err.(*NoValidHostError).Retryable() {
		t.Fatal("a capacity failure must not be retryable")
	}
}

func TestNoValidHostOnlyPendingIsRetryable(t *testing.T) {
	h := testHost("h1")
	h.Pending = Resources{VCPUs: 1, MemoryMiB: 8192}
	h.Allocated = h.Pending
	c := clusterOf(h)
	p, _ := NewPolicy(Spread)
	_, err := Schedule(c, &Request{Resources: Resources{MemoryMiB: 1024}}, p, rand.New(rand.NewPCG(1, 1)))
	nvh, ok := err.(*NoValidHostError)
	if !ok || !nvh.Retryable() {
		t.Fatalf("err = %v, want a retryable NoValidHostError", err)
	}
}

// TestSampleBound: the scan stops after SampleSize feasible hosts, and
// without a bound every host is ranked.
func TestSampleBound(t *testing.T) {
	var hosts []*Host
	for i := range 1000 {
		hosts = append(hosts, testHost(fmt.Sprintf("h%d", i)))
	}
	c := clusterOf(hosts...)
	rng := rand.New(rand.NewPCG(3, 4))
	for _, tt := range []struct{ sample, want int }{{0, DefaultSampleSize}, {10, 10}, {-1, 1000}, {5000, 1000}} {
		p, _ := NewPolicy(Spread)
		p.SampleSize = tt.sample
		d, err := Schedule(c, &Request{}, p, rng)
		if err != nil {
			t.Fatal(err)
		}
		if d.Candidates != tt.want || d.Scanned != tt.want {
			t.Fatalf("SampleSize %d: ranked %d of %d scanned, want %d", tt.sample, d.Candidates, d.Scanned, tt.want)
		}
	}
}

// TestPermutationVisitsEveryHost: the random visiting order is a
// permutation for every cluster size, so a single feasible host is always
// found.
func TestPermutationVisitsEveryHost(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for n := 1; n <= 64; n++ {
		for range 10 {
			start, stride := permutation(n, rng)
			seen := make([]bool, n)
			for i := range n {
				j := (start + i*stride) % n
				if seen[j] {
					t.Fatalf("n=%d start=%d stride=%d visits %d twice", n, start, stride, j)
				}
				seen[j] = true
			}
		}
	}
}

// TestTieBreakIsRandom: equal hosts are all chosen, roughly evenly.
func TestTieBreakIsRandom(t *testing.T) {
	c := clusterOf(testHost("a"), testHost("b"), testHost("c"), testHost("d"))
	p, _ := NewPolicy(Spread)
	p.SampleSize = -1
	rng := rand.New(rand.NewPCG(7, 8))
	counts := map[string]int{}
	const n = 4000
	for range n {
		d, err := Schedule(c, &Request{}, p, rng)
		if err != nil {
			t.Fatal(err)
		}
		counts[d.Host.Name]++
	}
	for _, h := range []string{"a", "b", "c", "d"} {
		if counts[h] < n/4*8/10 || counts[h] > n/4*12/10 {
			t.Fatalf("tie-break is biased: %v", counts)
		}
	}
}

// TestPropertyNeverOvercommits places random requests one after the other
// on random hosts (random capacities, ratios, down/disabled hosts) and
// checks after each placement that no host exceeds its limits, and that
// every refusal is a NoValidHostError that accounts for every host.
func TestPropertyNeverOvercommits(t *testing.T) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 99))
		var hosts []*Host
		for i := range 1 + rng.IntN(60) {
			h := &Host{
				Name: fmt.Sprintf("h%d", i), Zone: []string{"az1", "az2"}[rng.IntN(2)],
				Hypervisors: [][]string{{"tcg"}, {"kvm", "tcg"}}[rng.IntN(2)],
				Up:          rng.IntN(10) > 0, Disabled: rng.IntN(20) == 0,
				Capacity: Resources{VCPUs: int64(1 + rng.IntN(32)), MemoryMiB: int64(1024 * (1 + rng.IntN(64))), DiskGiB: int64(10 + rng.IntN(500))},
				Ratios:   Ratios{CPU: []float64{1, 2, 4, 16}[rng.IntN(4)], RAM: []float64{1, 1.5}[rng.IntN(2)], Disk: 1},
			}
			hosts = append(hosts, h)
		}
		c := clusterOf(hosts...)
		p, _ := NewPolicy([]Strategy{Spread, Pack}[rng.IntN(2)])
		p.SampleSize = []int{0, 4, -1}[rng.IntN(3)]
		placed, refused := 0, 0
		for i := range 2000 {
			req := &Request{
				VMID:      fmt.Sprint(i),
				Resources: Resources{VCPUs: int64(1 + rng.IntN(8)), MemoryMiB: int64(256 * (1 + rng.IntN(32))), DiskGiB: int64(rng.IntN(80))},
			}
			if rng.IntN(4) == 0 {
				req.Zone = "az2"
			}
			if rng.IntN(4) == 0 {
				req.Hypervisor = "kvm"
			}
			d, err := Schedule(c, req, p, rng)
			if err != nil {
				nvh, ok := err.(*NoValidHostError)
				if !ok {
					t.Fatalf("seed %d: unexpected error %v", seed, err)
				}
				sum := 0
				for _, r := range nvh.Removed {
					sum += r.Count
				}
				if sum != len(hosts) || nvh.Hosts != len(hosts) {
					t.Fatalf("seed %d: %q accounts for %d of %d hosts", seed, nvh.Error(), sum, len(hosts))
				}
				refused++
				continue
			}
			h := d.Host
			if !h.Up || h.Disabled || (req.Zone != "" && h.Zone != req.Zone) || (req.Hypervisor != "" && !h.HasHypervisor(req.Hypervisor)) {
				t.Fatalf("seed %d: placed %+v on infeasible host %+v", seed, req, h)
			}
			h.Allocated = h.Allocated.Add(req.Resources)
			h.VMCount++
			placed++
			if f := h.Free(); f.VCPUs < 0 || f.MemoryMiB < 0 || f.DiskGiB < 0 {
				t.Fatalf("seed %d: host %s over its limits: allocated %+v, limits %+v", seed, h.Name, h.Allocated, h.Limits())
			}
		}
		if placed+refused != 2000 {
			t.Fatalf("seed %d: %d placed + %d refused != 2000", seed, placed, refused)
		}
	}
}
