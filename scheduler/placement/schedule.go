package placement

import (
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
)

// DefaultSampleSize is how many feasible hosts are ranked per decision. The
// hosts are visited in a fresh random order and the scan stops at the
// SampleSize-th feasible one, so a decision costs O(SampleSize / density of
// feasible hosts) instead of O(hosts). The best of k uniformly sampled
// feasible hosts lies in the top 5% of all feasible hosts with probability
// 1 - 0.95^k: 96% for k = 64 (99.9% for the top 10%), whatever the cluster
// size. See docs/scheduler.md.
const DefaultSampleSize = 64

// Policy is a filter chain and weighers: the configurable part of a
// decision.
type Policy struct {
	Filters  []Filter
	Weighers []Weighted
	// SampleSize bounds the feasible hosts ranked per decision: 0 means
	// DefaultSampleSize, a negative value means every feasible host.
	SampleSize int
}

// NewPolicy returns the default filters and the weighers of strategy s.
func NewPolicy(s Strategy) (*Policy, error) {
	w, err := DefaultWeighers(s)
	if err != nil {
		return nil, err
	}
	return &Policy{Filters: DefaultFilters(), Weighers: w}, nil
}

// Decision is a successful placement.
type Decision struct {
	Host *Host
	// Score is the chosen host's combined weight.
	Score float64
	// Candidates is the number of feasible hosts ranked, Scanned the number
	// of hosts the filters looked at.
	Candidates, Scanned int
}

// Removal counts the hosts one filter removed and, where the filter says,
// why (e.g. Capacity: memory 900, vcpus 90).
type Removal struct {
	Filter string
	Count  int
	Why    map[string]int
}

// NoValidHostError says that no host passed the filters, and which filter
// removed how many hosts (each host is counted by the first filter that
// removed it), like Nova's NoValidHost.
type NoValidHostError struct {
	Hosts   int
	Removed []Removal
}

func (e *NoValidHostError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "no valid host: %d hosts", e.Hosts)
	sep := "; "
	for _, r := range e.Removed {
		fmt.Fprintf(&b, "%s%s removed %d", sep, r.Filter, r.Count)
		sep = ", "
		if len(r.Why) > 0 {
			whys := make([]string, 0, len(r.Why))
			for w := range r.Why {
				whys = append(whys, w)
			}
			sort.Strings(whys)
			b.WriteString(" (")
			for i, w := range whys {
				if i > 0 {
					b.WriteString(", ")
				}
				if len(r.Why) == 1 {
					b.WriteString(w)
				} else {
					fmt.Fprintf(&b, "%s %d", w, r.Why[w])
				}
			}
			b.WriteString(")")
		}
	}
	return b.String()
}

// RemovedBy returns how many hosts the named filter removed.
func (e *NoValidHostError) RemovedBy(filter string) int {
	for _, r := range e.Removed {
		if r.Filter == filter {
			return r.Count
		}
	}
	return 0
}

// Retryable reports whether some host was only unavailable because this
// replica's placements on it are not committed yet (they may still fail):
// the request must be retried once they are rather than failed.
func (e *NoValidHostError) Retryable() bool {
	for _, r := range e.Removed {
		if r.Filter == (Capacity{}).Name() && r.Why[WhyPending] > 0 {
			return true
		}
	}
	return false
}

// Schedule chooses a host for req in c, or returns a *NoValidHostError. It
// reads c and never modifies it. rng drives the sampling order and the
// tie-break; it is not safe for concurrent use, so give each goroutine its
// own.
func Schedule(c *Cluster, req *Request, p *Policy, rng *rand.Rand) (Decision, error) {
	if c.Partitioned {
		d, skipped, err := schedule(c, req, p, rng, true)
		if err == nil || skipped == 0 {
			return d, err
		}
	}
	d, _, err := schedule(c, req, p, rng, false)
	return d, err
}

// schedule is one pass over the hosts; with preferredOnly, hosts not
// marked Preferred are skipped (and counted in skipped) before any filter.
func schedule(c *Cluster, req *Request, p *Policy, rng *rand.Rand, preferredOnly bool) (Decision, int, error) {
	n := len(c.Hosts)
	skipped := 0
	limit := p.SampleSize
	switch {
	case limit == 0:
		limit = DefaultSampleSize
	case limit < 0 || limit > n:
		limit = n
	}
	candidates := make([]*Host, 0, limit)
	var removed []int
	var why []map[string]int

	// Visit hosts in a random permutation: i -> (start + i*stride) mod n with
	// stride coprime to n. No per-decision shuffle of the host slice.
	start, stride := permutation(n, rng)
	scanned := 0
	for i := 0; i < n && len(candidates) < limit; i++ {
		h := c.Hosts[(start+i*stride)%n]
		if preferredOnly && !h.Preferred {
			skipped++
			continue
		}
		scanned++
		ok := true
		for fi, f := range p.Filters {
			var w string
			if ok, w = f.Feasible(c, req, h); !ok {
				if removed == nil {
					removed = make([]int, len(p.Filters))
					why = make([]map[string]int, len(p.Filters))
				}
				removed[fi]++
				if w != "" {
					if why[fi] == nil {
						why[fi] = map[string]int{}
					}
					why[fi][w]++
				}
				break
			}
		}
		if ok {
			candidates = append(candidates, h)
		}
	}
	if len(candidates) == 0 {
		e := &NoValidHostError{Hosts: n}
		for fi, cnt := range removed {
			if cnt > 0 {
				e.Removed = append(e.Removed, Removal{Filter: p.Filters[fi].Name(), Count: cnt, Why: why[fi]})
			}
		}
		return Decision{}, skipped, e
	}

	best, score := weigh(c, req, p.Weighers, candidates, rng)
	return Decision{Host: best, Score: score, Candidates: len(candidates), Scanned: scanned}, skipped, nil
}

// weigh returns the candidate with the highest combined normalised weight,
// choosing uniformly among equal best ones.
func weigh(c *Cluster, req *Request, weighers []Weighted, candidates []*Host, rng *rand.Rand) (*Host, float64) {
	scores := make([]float64, len(candidates))
	raw := make([]float64, len(candidates))
	for _, w := range weighers {
		if w.Multiplier == 0 {
			continue
		}
		lo, hi := 0.0, 0.0
		for i, h := range candidates {
			raw[i] = w.Weigher.Weigh(c, req, h)
			if i == 0 || raw[i] < lo {
				lo = raw[i]
			}
			if i == 0 || raw[i] > hi {
				hi = raw[i]
			}
		}
		if hi == lo {
			continue // no preference among the candidates
		}
		for i := range candidates {
			scores[i] += w.Multiplier * (raw[i] - lo) / (hi - lo)
		}
	}
	const eps = 1e-9
	bestI, ties := 0, 1
	for i := 1; i < len(candidates); i++ {
		switch {
		case scores[i] > scores[bestI]+eps:
			bestI, ties = i, 1
		case scores[i] >= scores[bestI]-eps:
			// Reservoir sampling: each of the tied hosts ends up chosen
			// with probability 1/ties.
			ties++
			if rng.IntN(ties) == 0 {
				bestI = i
			}
		}
	}
	return candidates[bestI], scores[bestI]
}

// permutation returns a random start and a random stride coprime to n, so
// that (start + i*stride) mod n for i in [0, n) visits every index once.
func permutation(n int, rng *rand.Rand) (start, stride int) {
	if n <= 1 {
		return 0, 1
	}
	start = rng.IntN(n)
	for {
		stride = 1 + rng.IntN(n-1)
		if gcd(stride, n) == 1 {
			return start, stride
		}
	}
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
