package invariants

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Hosts is what the auditor reads from the cloud's hypervisor hosts.
type Hosts interface {
	// Names are every host to read.
	Names() []string
	// Observe reads host now. An error means the host could not be read
	// (stopped, unreachable), which is itself a violation.
	Observe(ctx context.Context, host string) (Observation, error)
}

// Options tune Audit.
type Options struct {
	// Deleted are VM ids the caller deleted: they must exist nowhere.
	Deleted []string
	// Settle is how long the cloud has to converge; 0 checks once.
	Settle time.Duration
	// Interval is the pause between two snapshots (default 2 s).
	Interval time.Duration
	// Each, if set, is given every snapshot's violations (the chaos run
	// counts duplicates that appear while the cloud converges).
	Each func([]Violation)
}

// Report is the outcome of an Audit.
type Report struct {
	// Violations are those of the last snapshot: none if the cloud
	// converged.
	Violations []Violation
	// Snapshots is how many were taken; Elapsed how long until the last.
	Snapshots int
	Elapsed   time.Duration
}

// Audit takes snapshots of etcd and every host and checks them, until one
// has no violation or opts.Settle has passed; the report holds the last
// snapshot's violations. The error is for a failure to read etcd at all
// (or ctx ending) at the last attempt; hosts that cannot be read are
// violations.
func Audit(ctx context.Context, kv clientv3.KV, hosts Hosts, opts Options) (Report, error) {
	if opts.Interval <= 0 {
		opts.Interval = 2 * time.Second
	}
	start := time.Now()
	deadline := start.Add(opts.Settle)
	var r Report
	for {
		s, err := Take(ctx, kv, hosts)
		r.Snapshots++
		r.Elapsed = time.Since(start)
		if err == nil {
			r.Violations = Check(s, opts.Deleted)
			if opts.Each != nil {
				opts.Each(r.Violations)
			}
			if len(r.Violations) == 0 {
				return r, nil
			}
		}
		if time.Now().Add(opts.Interval).After(deadline) {
			return r, err
		}
		select {
		case <-ctx.Done():
			return r, ctx.Err()
		case <-time.After(opts.Interval):
		}
	}
}

// Take reads one snapshot: etcd first, then every host at once. A VM
// created between the two reads shows up as an orphan on its host, one
// deleted as a lost VM; Audit's retries absorb both.
func Take(ctx context.Context, kv clientv3.KV, hosts Hosts) (Snapshot, error) {
	cloud, err := ReadCloud(ctx, kv)
	if err != nil {
		return Snapshot{}, err
	}
	s := Snapshot{Cloud: cloud, Hosts: map[string]Observation{}, HostErrors: map[string]error{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	names := hosts.Names()
	sort.Strings(names)
	for _, h := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o, err := hosts.Observe(ctx, h)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				s.HostErrors[h] = err
				return
			}
			s.Hosts[h] = o
		}()
	}
	wg.Wait()
	return s, nil
}

// String renders a report for a person: one line per violation.
func (r Report) String() string {
	if len(r.Violations) == 0 {
		return fmt.Sprintf("no violations (%d snapshots, %s)", r.Snapshots, r.Elapsed.Round(time.Millisecond))
	}
	out := fmt.Sprintf("%d violations after %d snapshots (%s):", len(r.Violations), r.Snapshots, r.Elapsed.Round(time.Millisecond))
	for _, v := range r.Violations {
		out += "\n  " + v.String()
	}
	return out
}
