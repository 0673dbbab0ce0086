package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/hack/benchdoc"
	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/lab/invariants"
)

// The chaos run's own lab, apart from `make lab`'s, the lab tests' and
// the lab benchmark's, so it may break it freely.
const (
	chaosLabName   = "mclc"
	chaosLabDir    = "/var/lib/minicloud-labchaos"
	chaosLabSubnet = "10.253.0.0/24"
)

// result is one row of the table.
type result struct {
	scenario, target string
	// recovered is from the fault to the first clean audit; 0 if the
	// audit never came clean.
	recovered  time.Duration
	lost       int // VMs that existed or were accepted, gone without a delete
	notRunning int // of those, not RUNNING at the end
	duplicates int // most one-host and unique violations in one snapshot
	violations []string
	err        error
}

// runChaos brings up its own lab, runs a seeded random sequence of the
// scenarios, each followed by the auditor, and writes the table.
func runChaos(ctx context.Context, args []string) (int, error) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	seed := fs.Int64("seed", time.Now().UnixNano()%100000, "seed of the scenario order and timings")
	rounds := fs.Int("rounds", 1, "passes over every scenario, each in a seeded random order")
	settle := fs.Duration("settle", 3*time.Minute, "how long the cloud may take to converge after each scenario")
	docs := fs.String("docs", "docs/benchmarks.md", "page whose chaos section gets the table (empty: print only)")
	keep := fs.Bool("keep", false, "leave the lab up at the end")
	if err := fs.Parse(args); err != nil {
		return 2, nil
	}
	l, cleanup, err := chaosLab(ctx)
	if err != nil {
		return 1, err
	}
	defer func() {
		if !*keep {
			cleanup()
		}
	}()
	c, err := l.Client(ctx)
	if err != nil {
		return 1, err
	}
	defer c.Close()
	unlimited := int64(-1)
	if _, err := c.Quotas.SetQuota(ctx, &minicloudv1.SetQuotaRequest{Limits: &minicloudv1.QuotaLimits{Instances: &unlimited, Vcpus: &unlimited}}); err != nil {
		return 1, err
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "chaos %s: %s\n", time.Now().UTC().Format("15:04:05"), fmt.Sprintf(format, args...))
	}
	e := &env{l: l, c: c, rnd: rand.New(rand.NewSource(*seed)), logf: logf}
	start := time.Now()
	if r, err := auditOnce(ctx, l, invariants.Options{Settle: *settle}); err != nil || len(r.Violations) > 0 {
		return 1, fmt.Errorf("the fresh lab does not audit clean: %v %s", err, r)
	}
	var results []result
	for round := 0; round < *rounds; round++ {
		for _, i := range e.rnd.Perm(len(scenarios)) {
			sc := scenarios[i]
			host := l.HostNames()[e.rnd.Intn(l.Hosts)]
			logf("%s (%s)", sc.name, host)
			res := e.play(ctx, sc, host, *settle)
			logf("%s: recovered in %s, lost %d, not running %d, duplicates %d, violations %d, err %v",
				sc.name, res.recovered.Round(time.Second), res.lost, res.notRunning, res.duplicates, len(res.violations), res.err)
			results = append(results, res)
			if ctx.Err() != nil {
				break
			}
		}
	}
	table := render(results, *seed, *rounds, time.Since(start))
	fmt.Print(table)
	if *docs != "" {
		if err := benchdoc.RewriteSection(*docs, "chaos", table); err != nil {
			return 1, err
		}
	}
	for _, r := range results {
		if r.recovered == 0 || r.lost > 0 || r.duplicates > 0 || r.err != nil {
			return 1, nil
		}
	}
	return 0, nil
}

// play runs one scenario, audits, and puts the lab back: the scenario's
// VMs deleted (and audited as deleted), every VM running again.
func (e *env) play(ctx context.Context, sc scenario, host string, settle time.Duration) result {
	res := result{scenario: sc.name}
	before, err := e.vmNames(ctx)
	if err != nil {
		res.err = err
		return res
	}
	stopWatch := e.watchDuplicates(ctx, &res)
	o, err := sc.run(ctx, e, host)
	stopWatch()
	res.target, res.err = o.host, err
	if o.note != "" {
		res.target += " (" + o.note + ")"
	}
	if o.faultAt.IsZero() {
		o.faultAt = time.Now()
	}
	auditStart := time.Now()
	// Duplicates count while the cloud converges too: a VM running twice
	// for a moment is a duplicate even if one copy is gone by the end.
	r, aerr := auditOnce(ctx, e.l, invariants.Options{Deleted: o.deleted, Settle: settle, Each: func(vs []invariants.Violation) {
		res.duplicates = max(res.duplicates, duplicates(vs))
	}})
	if aerr == nil && len(r.Violations) == 0 {
		res.recovered = auditStart.Sub(o.faultAt) + r.Elapsed
	}
	res.err = errors.Join(res.err, aerr)
	for _, v := range r.Violations {
		res.violations = append(res.violations, v.String())
	}
	after, err := e.vmNames(ctx)
	res.err = errors.Join(res.err, err)
	watched := o.created
	for n := range before {
		watched = append(watched, n)
	}
	for _, n := range watched {
		phase, ok := after[n]
		switch {
		case !ok:
			res.lost++
		case phase != minicloudv1.VMPhase_VM_PHASE_RUNNING:
			res.notRunning++
		}
	}
	// Back to the lab as it was: the scenario's VMs gone (and audited
	// gone), every VM RUNNING.
	var ids []string
	for _, n := range o.created {
		if vm, err := e.c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: n}); err == nil {
			ids = append(ids, vm.GetMeta().GetId())
		}
	}
	res.err = errors.Join(res.err, e.remove(ctx, o.created))
	for _, h := range e.l.HostNames() {
		res.err = errors.Join(res.err, e.startStopped(ctx, h))
	}
	if r, err := auditOnce(ctx, e.l, invariants.Options{Deleted: ids, Settle: settle}); err != nil || len(r.Violations) > 0 {
		res.err = errors.Join(res.err, err)
		for _, v := range r.Violations {
			res.violations = append(res.violations, "after clean-up: "+v.String())
		}
	}
	return res
}

// duplicates counts the one-host and unique violations in vs.
func duplicates(vs []invariants.Violation) int {
	n := 0
	for _, v := range vs {
		if v.Invariant == invariants.OneHost || v.Invariant == invariants.Unique {
			// Running twice, or an address twice; a definition left on a
			// fenced host that will not start it is an orphan, not a
			// duplicate.
			n++
		}
	}
	return n
}

// watchDuplicates takes a snapshot every few seconds while a fault lasts
// (a partitioned or stopped host is still read from this machine, as far
// as it can be) and keeps the most duplicates seen in res; the returned
// func stops it and waits.
func (e *env) watchDuplicates(ctx context.Context, res *result) func() {
	etcd, err := e.l.EtcdClient()
	if err != nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer etcd.Close()
		for {
			if s, err := invariants.Take(ctx, etcd, invariants.LabHosts{Lab: e.l}); err == nil {
				n := duplicates(invariants.Check(s, nil))
				res.duplicates = max(res.duplicates, n) // read only after stop

			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(3 * time.Second):
			}
		}
	}()
	return func() { cancel(); <-done }
}

// vmNames maps every VM's name to its phase.
func (e *env) vmNames(ctx context.Context) (map[string]minicloudv1.VMPhase, error) {
	list, err := e.c.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{AllProjects: true})
	if err != nil {
		return nil, err
	}
	out := map[string]minicloudv1.VMPhase{}
	for _, vm := range list.GetVms() {
		out[vm.GetMeta().GetName()] = vm.GetStatus().GetPhase()
	}
	return out, nil
}

func render(results []result, seed int64, rounds int, took time.Duration) string {
	var b strings.Builder
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&b, "`make chaos` (`hack/chaos run --seed %d --rounds %d`, as root) — its own 3-host lab (`%s`, %s, %s; docs/lab.md), the tiny image under TCG on 2 shared cores; each scenario is followed by the invariant auditor (`lab/invariants`, settle 3 min). Run took %s, load average %s at the end; measured %s.\n\n",
		seed, rounds, chaosLabName, chaosLabDir, chaosLabSubnet, took.Round(time.Second), strings.Join(strings.Fields(string(load))[:3], " "), time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	b.WriteString("| scenario | target | time to recover | VMs lost | not RUNNING after | duplicates | violations left |\n|---|---|---:|---:|---:|---:|---|\n")
	for _, r := range results {
		rec := "**not recovered**"
		if r.recovered > 0 {
			rec = r.recovered.Round(100 * time.Millisecond).String()
		}
		left := "none"
		if len(r.violations) > 0 {
			left = strings.ReplaceAll(strings.Join(r.violations, "; "), "|", "/")
		}
		if r.err != nil {
			left += "; error: " + strings.ReplaceAll(strings.ReplaceAll(r.err.Error(), "\n", " "), "|", "/")
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %d | %d | %d | %s |\n", r.scenario, r.target, rec, r.lost, r.notRunning, r.duplicates, left)
	}
	b.WriteString("\nTime to recover is from the fault's injection to the first snapshot in which every invariant holds (docs/lab.md, \"Checking invariants\"), so it includes the fault's own length (a partition lasts 25-30 s, longer than the 15 s host lease). VMs lost: VMs that existed before the scenario or whose create it saw accepted, missing at the end without a delete. Not RUNNING after: of those, the ones that exist but do not run once the cloud has converged (a host that was stopped brings its VMs back shut off, STOPPED with a reason, unless their restart policy starts them; the clean-up then starts them, as an operator would). Duplicates: the most `one-host` (a VM running on two hosts) and `unique` (an address or MAC held twice) violations in any one snapshot, taken every 3 s while the fault lasts (a partitioned host is still read from the machine) and every 2 s while the cloud converges. After each scenario its VMs are deleted and audited as deleted, and every VM is started again.\n")
	return b.String()
}

// chaosLab brings the run's own lab up (removing one an earlier run
// left) with the binaries beside this one and the repository's tiny
// image, as `up` does; cleanup takes it down and reports leftovers.
func chaosLab(ctx context.Context) (*lab.Lab, func(), error) {
	self, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	repo := envOr("LAB_REPO", filepath.Join(filepath.Dir(self), ".."))
	tiny := filepath.Join(repo, "images/out/tiny")
	if _, err := os.Stat(filepath.Join(tiny, "disk.qcow2")); err != nil {
		return nil, nil, fmt.Errorf("tiny image: %w (hack/images/build-tiny.sh builds it)", err)
	}
	if old, err := lab.Load(chaosLabDir, os.Stderr); err == nil {
		if err := old.Down(ctx); err != nil {
			return nil, nil, fmt.Errorf("remove the lab of an earlier run: %w", err)
		}
	}
	l, err := lab.New(lab.Config{
		Name: chaosLabName, Dir: chaosLabDir, Hosts: 3, Subnet: netip.MustParsePrefix(chaosLabSubnet),
		BinDir: filepath.Dir(self), Images: map[string]string{"tiny": tiny},
		Capacity: &lab.Capacity{VCPUs: 16, MemoryMiB: 8192, DiskGiB: 64},
	}, os.Stderr)
	if err != nil {
		return nil, nil, err
	}
	cleanup := func() {
		var ids []string
		for _, h := range l.HostNames() {
			ids = append(ids, l.VMIDs(h)...)
		}
		if err := l.Down(context.Background()); err != nil {
			fmt.Fprintln(os.Stderr, "lab down:", err)
		}
		if leaks := l.Leftovers(ids); len(leaks) > 0 {
			fmt.Fprintf(os.Stderr, "the lab left behind:\n  %s\n", strings.Join(leaks, "\n  "))
		}
	}
	if err := l.Up(ctx); err != nil {
		cleanup()
		return nil, nil, fmt.Errorf("lab up: %w", err)
	}
	return l, cleanup, nil
}
