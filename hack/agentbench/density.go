package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// The density mode (issue 15, section 4): N tiny VMs booted at once on the
// one host of the all-in-one, all RUNNING and GuestReady; then the agent at
// rest with N VMs (its process's RSS and CPU, one full resync's reconcile
// passes from its own histogram); then a crash and restart of the
// all-in-one on the same state, timed until every VM is reconciled again,
// with every domain checked to be the same domain and the same QEMU
// process. Each VM count runs on an empty host and deletes its VMs before
// the next count starts.

// densityFlavor is the flavor of the density VMs: the tiny image boots in
// 128 MiB, so 50 of them fit with room to spare.
const densityFlavor = "nano"

// stableFor is how long the agent's metrics must keep saying "every VM
// reconciled, nothing queued, nothing failing" before a resync counts as
// done: a pass in flight is not in the queue, so one good scrape could
// fall between two passes of the same burst.
const stableFor = 2 * time.Second

// density is what one VM count measured.
type density struct {
	n int

	total      time.Duration   // first CreateVM sent → the last VM's GuestReady delivered
	readyNames []string        // the VMs GuestReady within the bound (all, normally)
	toReady    []time.Duration // per VM of readyNames: CreateVM sent → GuestReady delivered
	bootCPU    time.Duration   // the all-in-one's CPU from the first CreateVM until every VM is GuestReady (or the bound)

	rssEmpty, rssFull int64         // the all-in-one's RSS before the creates and at rest with n VMs
	qemuRSS           int64         // mean RSS of one VM's QEMU
	restCPU           time.Duration // the all-in-one's CPU over restWindow at rest
	restWindow        time.Duration // one full resync of every VM, at rest
	steady            passes        // reconcile passes in restWindow
	steadyCPU         passes        // their CPU time (the agent's own clock of each pass)

	restartServing time.Duration // kill → the new process's API healthy, its host UP
	restartSynced  time.Duration // kill → every VM reconciled again (agent metrics)
	afterRestart   passes        // reconcile passes of the new process until then
	sameDomains    int           // VMs whose domain UUID and QEMU PID survived the restart
}

// passes is a delta of the agent's reconcile histogram (result ok).
type passes struct {
	count    uint64
	p50, p99 time.Duration
}

// measureDensity runs the density mode for each VM count in turn.
func (b *bench) measureDensity(ctx context.Context, counts []int, readyTimeout time.Duration) ([]density, error) {
	if err := b.cloud.mc(ctx, "flavor", "create", densityFlavor, "--vcpus", "1", "--memory-mib", "128", "--disk-gib", "1"); err != nil {
		return nil, err
	}
	// The default project's quota (20 instances) is below the counts.
	most := strconv.Itoa(slices.Max(counts))
	if err := b.cloud.mc(ctx, "quota", "set", "default", "--instances", most, "--vcpus", most, "--memory-mib", strconv.Itoa(128*slices.Max(counts)), "--disk-gib", most); err != nil {
		return nil, err
	}
	b.loadBefore, b.started = loadAverage(), time.Now()
	var out []density
	for _, n := range counts {
		logf("density: %d VMs at once", n)
		d, err := b.densityRound(ctx, n, readyTimeout)
		if err != nil {
			return out, fmt.Errorf("%d VMs: %w", n, err)
		}
		out = append(out, d)
	}
	b.loadAfter, b.elapsed = loadAverage(), time.Since(b.started)
	return out, nil
}

func (b *bench) densityRound(ctx context.Context, n int, readyTimeout time.Duration) (d density, err error) {
	d.n = n
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("dense%d-%d", n, i)
	}
	var samples []sample
	defer func() {
		// Delete even when the round failed, so nothing outlives the run
		// (unless a failed restart left no cloud to ask: then the purge
		// of its data directory removes them).
		if b.cloud.client == nil {
			return
		}
		var created []string
		for _, s := range samples {
			if s.id != "" {
				created = append(created, s.name)
			}
		}
		if derr := b.deleteVMs(ctx, created); derr != nil {
			err = errors.Join(err, derr)
		}
	}()

	empty, err := readProc(b.cloud.proc.Process.Pid)
	if err != nil {
		return d, err
	}
	d.rssEmpty = empty.rss
	samples, err = b.createVMs(ctx, names, densityFlavor)
	if err != nil {
		return d, err
	}
	ready := func(st *vmState) bool { return !st.ready.IsZero() }
	if err := b.watch.waitFor(ctx, names, "GuestReady", readyTimeout, ready); err != nil {
		// Past the bound, the round goes on with the guests that made it
		// (the rest need only be RUNNING) and the table says how many.
		if ctx.Err() != nil || !b.allRunning(names) {
			return d, err
		}
		logf("density: %v; going on with the VMs that are", err)
	}
	booted, err := readProc(b.cloud.proc.Process.Pid)
	if err != nil {
		return d, err
	}
	d.bootCPU = booted.cpu - empty.cpu
	first, last := samples[0].sent, time.Time{}
	for _, s := range samples {
		at := b.watch.state(s.name).ready
		if at.IsZero() {
			continue
		}
		d.readyNames = append(d.readyNames, s.name)
		d.toReady = append(d.toReady, at.Sub(s.sent))
		if at.After(last) {
			last = at
		}
		if s.sent.Before(first) {
			first = s.sent
		}
	}
	d.total = last.Sub(first)
	logf("density: %d VMs GuestReady after %s; at rest until one full resync", n, d.total.Round(time.Millisecond))

	// At rest: every VM's next periodic pass (one a minute).
	before, err := b.scrapeAgent(ctx)
	if err != nil {
		return d, err
	}
	restStart, err := readProc(b.cloud.proc.Process.Pid)
	if err != nil {
		return d, err
	}
	t0 := time.Now()
	rest, _, err := b.waitReconciled(ctx, n, before.ok, resyncPeriod+time.Second, 3*time.Minute)
	if err != nil {
		return d, fmt.Errorf("at rest: %w", err)
	}
	restEnd, err := readProc(b.cloud.proc.Process.Pid)
	if err != nil {
		return d, err
	}
	d.restWindow, d.restCPU, d.rssFull = time.Since(t0), restEnd.cpu-restStart.cpu, restEnd.rss
	d.steady = histogramDelta(before.ok, rest.ok)
	d.steadyCPU = histogramDelta(before.okCPU, rest.okCPU)

	ids := make([]string, n)
	for i, s := range samples {
		ids[i] = s.id
	}
	domains, err := domainIdentities(ctx, ids)
	if err != nil {
		return d, err
	}
	for _, dom := range domains {
		if q, err := readProc(dom.pid); err == nil {
			d.qemuRSS += q.rss / int64(n)
		}
	}

	logf("density: killing and restarting the all-in-one with %d VMs", n)
	killed := time.Now()
	b.stopWatch()
	b.cloud.kill()
	if err := b.cloud.start(ctx); err != nil {
		return d, fmt.Errorf("restart: %w", err)
	}
	d.restartServing = time.Since(killed)
	b.startWatch(ctx)
	synced, at, err := b.waitReconciled(ctx, n, nil, 0, 5*time.Minute)
	if err != nil {
		return d, fmt.Errorf("after the restart: %w", err)
	}
	d.restartSynced = at.Sub(killed)
	d.afterRestart = histogramDelta(nil, synced.ok)

	again, err := domainIdentities(ctx, ids)
	if err != nil {
		return d, err
	}
	var changed []string
	for id, dom := range domains {
		if again[id] == dom {
			d.sameDomains++
		} else {
			changed = append(changed, fmt.Sprintf("mc-%s: %+v before, %+v after", id, dom, again[id]))
		}
	}
	if len(changed) > 0 {
		return d, fmt.Errorf("the restart recreated %d domain(s): %s", len(changed), strings.Join(changed, "; "))
	}
	return d, b.checkStillReady(ctx, names, d.readyNames)
}

// allRunning says whether the watch has seen every VM of names RUNNING.
func (b *bench) allRunning(names []string) bool {
	for _, name := range names {
		if b.watch.state(name).running.IsZero() {
			return false
		}
	}
	return true
}

// checkStillReady asks the API whether every VM is still RUNNING, and
// those of ready with GuestReady true.
func (b *bench) checkStillReady(ctx context.Context, names, ready []string) error {
	var errs []error
	for _, name := range names {
		vm, err := b.cloud.client.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: name})
		if err != nil {
			errs = append(errs, fmt.Errorf("get VM %s: %w", name, err))
			continue
		}
		if vm.GetStatus().GetPhase() != lifecycle.Running || (slices.Contains(ready, name) && !guestReady(vm)) {
			errs = append(errs, fmt.Errorf("VM %s is %s (GuestReady %v) after the restart", name, vm.GetStatus().GetPhase(), guestReady(vm)))
		}
	}
	return errors.Join(errs...)
}

// agentScrape is what the density mode reads of the agent's /metrics.
type agentScrape struct {
	ok                    *dto.Histogram // minicloud_agent_reconcile_duration_seconds{result="ok"}
	okCPU                 *dto.Histogram // minicloud_agent_reconcile_cpu_seconds{result="ok"}
	running, due, failing float64
}

func (b *bench) scrapeAgent(ctx context.Context) (agentScrape, error) {
	var s agentScrape
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+b.cloud.agentMetrics+"/metrics", nil)
	if err != nil {
		return s, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return s, fmt.Errorf("scrape the agent's metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("scrape the agent's metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return s, fmt.Errorf("parse the agent's metrics: %w", err)
	}
	label := func(m *dto.Metric, name string) string {
		for _, l := range m.GetLabel() {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
		return ""
	}
	for _, m := range mfs["minicloud_agent_reconcile_duration_seconds"].GetMetric() {
		if label(m, "result") == "ok" {
			s.ok = m.GetHistogram()
		}
	}
	for _, m := range mfs["minicloud_agent_reconcile_cpu_seconds"].GetMetric() {
		if label(m, "result") == "ok" {
			s.okCPU = m.GetHistogram()
		}
	}
	for _, m := range mfs["minicloud_agent_vms"].GetMetric() {
		if label(m, "phase") == lifecycle.PhaseName(lifecycle.Running) {
			s.running = m.GetGauge().GetValue()
		}
	}
	if m := mfs["minicloud_agent_reconcile_queue_length"].GetMetric(); len(m) > 0 {
		s.due = m[0].GetGauge().GetValue()
	}
	if m := mfs["minicloud_agent_reconcile_failing_vms"].GetMetric(); len(m) > 0 {
		s.failing = m[0].GetGauge().GetValue()
	}
	return s, nil
}

// resyncPeriod is the agent's default Config.ResyncPeriod: a span at rest
// at least this long (plus the passes it queues) holds one periodic pass
// over every VM.
const resyncPeriod = time.Minute

// waitReconciled polls the agent's metrics until it holds n RUNNING VMs,
// has made at least n good passes since since (nil: since it started),
// and has nothing queued or failing — and still says so stableFor later —
// but not before atLeast has passed. It returns the scrape at the end and
// when the condition first held.
func (b *bench) waitReconciled(ctx context.Context, n int, since *dto.Histogram, atLeast, timeout time.Duration) (agentScrape, time.Time, error) {
	start := time.Now()
	deadline := start.Add(timeout)
	var first time.Time
	var s agentScrape
	for {
		var err error
		s, err = b.scrapeAgent(ctx)
		now := time.Now()
		switch {
		case err != nil:
			// The restarted agent may not serve its metrics yet.
			first = time.Time{}
		case now.Sub(start) >= atLeast && int(s.running) == n && s.ok.GetSampleCount()-since.GetSampleCount() >= uint64(n) && s.due == 0 && s.failing == 0:
			if first.IsZero() {
				first = now
			}
			if now.Sub(first) >= stableFor {
				return s, first, nil
			}
		default:
			first = time.Time{}
		}
		if now.After(deadline) {
			return s, first, fmt.Errorf("the agent did not reconcile all %d VMs within %v (last scrape: %d RUNNING, %d passes, %v queued, %v failing; %v)",
				n, timeout, int(s.running), s.ok.GetSampleCount()-since.GetSampleCount(), s.due, s.failing, err)
		}
		// Until atLeast nothing can end the wait: scrape once a second
		// then, not ten times, since the at-rest span's CPU is measured on
		// the same process and each scrape is work of its own.
		poll := 100 * time.Millisecond
		if now.Sub(start) < atLeast {
			poll = time.Second
		}
		select {
		case <-ctx.Done():
			return s, first, ctx.Err()
		case <-time.After(poll):
		}
	}
}

// histogramDelta is the p50 and p99 of the observations in to that are not
// in from (nil: none), interpolated within a bucket as Prometheus'
// histogram_quantile does; an observation beyond the last bucket counts
// as its bound.
func histogramDelta(from, to *dto.Histogram) passes {
	var p passes
	p.count = to.GetSampleCount() - from.GetSampleCount()
	if p.count == 0 {
		return p
	}
	bounds := make([]float64, 0, len(to.GetBucket()))
	counts := make([]uint64, 0, len(to.GetBucket()))
	for i, bk := range to.GetBucket() {
		c := bk.GetCumulativeCount()
		if i < len(from.GetBucket()) {
			c -= from.GetBucket()[i].GetCumulativeCount()
		}
		bounds, counts = append(bounds, bk.GetUpperBound()), append(counts, c)
	}
	quantile := func(q float64) time.Duration {
		rank := q * float64(p.count)
		lower, below := 0.0, uint64(0)
		for i, c := range counts {
			if float64(c) >= rank && c > below {
				v := lower + (bounds[i]-lower)*(rank-float64(below))/float64(c-below)
				return time.Duration(v * float64(time.Second))
			}
			lower, below = bounds[i], c
		}
		return time.Duration(lower * float64(time.Second))
	}
	p.p50, p.p99 = quantile(0.5), quantile(0.99)
	return p
}

// domainIdentity is what a restart must not change: the domain and its
// QEMU process.
type domainIdentity struct {
	uuid string
	pid  int
}

// domainIdentities asks libvirt (not minicloud) for each VM's domain UUID
// and reads its QEMU PID from libvirt's pid file.
func domainIdentities(ctx context.Context, ids []string) (map[string]domainIdentity, error) {
	out := map[string]domainIdentity{}
	for _, id := range ids {
		u, err := virsh(ctx, "domuuid", "mc-"+id)
		if err != nil {
			return nil, err
		}
		raw, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", "mc-"+id+".pid"))
		if err != nil {
			return nil, fmt.Errorf("QEMU pid of mc-%s: %w", id, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
		if err != nil {
			return nil, fmt.Errorf("QEMU pid file of mc-%s: %w", id, err)
		}
		out[id] = domainIdentity{uuid: strings.TrimSpace(u), pid: pid}
	}
	return out, nil
}

// procStats is a process's CPU (its own and its waited-for children's,
// e.g. qemu-img) and resident memory, from /proc.
type procStats struct {
	cpu time.Duration
	rss int64 // bytes
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on
// every Linux architecture Go runs on.
const clockTicks = 100

func readProc(pid int) (procStats, error) {
	var p procStats
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return p, err
	}
	// Fields after the command name, which may hold spaces and ')'.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+1:]))
	if len(f) < 15 {
		return p, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks int64
	for _, v := range f[11:15] { // utime, stime, cutime, cstime
		t, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return p, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += t
	}
	p.cpu = time.Duration(ticks) * time.Second / clockTicks
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return p, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return p, fmt.Errorf("/proc/%d/status VmRSS: %w", pid, err)
			}
			p.rss = kb * 1024
		}
	}
	return p, nil
}

// quantile is percentile in secs, "—" for none.
func quantile(ds []time.Duration, p float64) string {
	if len(ds) == 0 {
		return "—"
	}
	return secs(percentile(ds, p))
}

// secs prints long spans in seconds, short ones as ms does.
func secs(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	return ms(d)
}

// cpuTime prints a pass's CPU time: µs below a millisecond.
func cpuTime(d time.Duration) string {
	if d < time.Millisecond {
		return fmt.Sprintf("%d µs", d.Microseconds())
	}
	return ms(d)
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func renderDensity(b *bench, rows []density, readyTimeout time.Duration) string {
	var sb strings.Builder
	counts := make([]string, len(rows))
	for i, d := range rows {
		counts[i] = strconv.Itoa(d.n)
	}
	fmt.Fprintf(&sb, "`go run ./hack/agentbench -density %s` (as root) — a real `minicloudd all-in-one` (embedded etcd, API, scheduler, agent, metadata) as a child process, %s, guests under TCG, the tiny image (direct kernel + initrd boot) with a flavor of 1 vCPU / 128 MiB / 1 GiB. Each VM count starts on an empty host: N CreateVM calls at once, then every VM waited for until `WatchVMs` delivers it RUNNING with GuestReady (the guest fetched its metadata; bound %s). 2 cores shared with other work; load average %s before the run, %s after; the run took %s; measured %s.\n\n",
		strings.Join(counts, ","), libvirtVersion(), readyTimeout, b.loadBefore, b.loadAfter, b.elapsed.Round(time.Second), b.started.UTC().Format("2006-01-02 15:04 UTC"))
	sb.WriteString("| VMs | GuestReady | all GuestReady after | create → GuestReady p50 | p99 | all-in-one CPU per VM, boot | all-in-one RSS, 0 → N VMs | RSS per VM | QEMU RSS per VM | all-in-one CPU per VM at rest | reconcile pass p50 | p99 | pass CPU p50 | CPU p99 | restart: serving | restart: every VM reconciled | pass p50 / p99 after restart | domains kept |\n")
	sb.WriteString("|---:|" + strings.Repeat("---:|", 17) + "\n")
	for _, d := range rows {
		rest := time.Duration(0)
		if d.restWindow > 0 {
			rest = time.Duration(float64(d.restCPU) / d.restWindow.Seconds() / float64(d.n))
		}
		all := secs(d.total)
		if len(d.readyNames) < d.n {
			all = "> " + secs(readyTimeout)
		}
		fmt.Fprintf(&sb, "| %d | %d of %d | %s | %s | %s | %s | %s → %s | %s | %s | %s/s | %s | %s | %s | %s | %s | %s | %s / %s | %d of %d |\n",
			d.n, len(d.readyNames), d.n, all, quantile(d.toReady, 0.5), quantile(d.toReady, 0.99),
			secs(d.bootCPU/time.Duration(d.n)), mib(d.rssEmpty), mib(d.rssFull), mib((d.rssFull-d.rssEmpty)/int64(d.n)), mib(d.qemuRSS),
			ms(rest), ms(d.steady.p50), ms(d.steady.p99), cpuTime(d.steadyCPU.p50), cpuTime(d.steadyCPU.p99),
			secs(d.restartServing), secs(d.restartSynced), ms(d.afterRestart.p50), ms(d.afterRestart.p99), d.sameDomains, d.n)
	}
	if len(rows) > 1 {
		lo, hi := rows[0], rows[len(rows)-1]
		ratio := func(hi, lo time.Duration) float64 {
			if lo <= 0 {
				return math.NaN()
			}
			return float64(hi) / float64(lo)
		}
		fmt.Fprintf(&sb, "\nPer-pass cost with %d VMs against %d: reconcile pass p50 %.2f× in wall time, %.2f× in CPU time (target: no growth with the count).\n",
			hi.n, lo.n, ratio(hi.steady.p50, lo.steady.p50), ratio(hi.steadyCPU.p50, lo.steadyCPU.p50))
	}
	var passes []string
	for _, d := range rows {
		passes = append(passes, fmt.Sprintf("%d passes in %s at rest and %d after the restart with %d VMs", d.steady.count, secs(d.restWindow), d.afterRestart.count, d.n))
	}
	fmt.Fprintf(&sb, "\nHow to read it. *GuestReady* is how many of the N were GuestReady within the bound (past it, the round goes on with every VM RUNNING, and p50/p99 are over those that made it); *all GuestReady after* is the first CreateVM sent → the last VM's GuestReady delivered; create → GuestReady is per VM, so under TCG on 2 cores it is mostly the guests' boots competing for the CPUs. The all-in-one is one process (agent, API, etcd, scheduler, metadata), so its RSS and CPU (from /proc: utime + stime, with its waited-for children such as `qemu-img`) are the whole control plane's; *CPU per VM, boot* is its CPU from the first CreateVM until every VM is GuestReady (or the bound), divided by N; *RSS per VM* is its growth from the empty host to N VMs at rest, divided by N. *At rest* is the span from every VM GuestReady until at least a minute later (the agent's periodic resync: one pass over every VM a minute), once the agent has made at least N passes in it with nothing queued or failing (the harness scrapes the agent's /metrics once a second in it, ten times a second only once the minute is over: a scrape is CPU of the same process); the reconcile pass p50/p99 are that span's passes, from the agent's own histogram `minicloud_agent_reconcile_duration_seconds{result=\"ok\"}` (buckets doubling from 0.25 ms, interpolated within a bucket as `histogram_quantile` does, so within a factor of 2); *pass CPU* is the same passes' CPU time from `minicloud_agent_reconcile_cpu_seconds{result=\"ok\"}` (buckets doubling from 10 µs): the agent locks each pass's goroutine to its thread and reads the thread's CPU clock around it (agent/passcpu.go), so it is the pass's own user and system time, not the time it waited for a CPU among the guests' threads, and leaves out what other goroutines and processes did for it (go-libvirt's reply decoding, libvirtd). *QEMU RSS per VM* is the mean resident memory of the guests' QEMU processes (guest RAM they touched included). Restart: SIGKILL of the all-in-one (a crash), then the same binary on the same data directory and addresses; *serving* is kill → its API healthy and its host UP, *every VM reconciled* is kill → the agent's metrics first say: N VMs RUNNING, at least N good passes since it started, nothing queued, nothing failing (and still so %s later). A running VM whose status did not change is confirmed by its pass, not rewritten (the agent writes only changes). *domains kept*: VMs whose libvirt domain UUID and QEMU PID were the same after the restart (libvirt's view, not minicloud's); every VM was then checked RUNNING and GuestReady through the API. Passes counted: %s. Clean-up: every VM deleted through the API and checked gone from libvirt, the links and the agent's directory before the next count; the all-in-one's data directory removed at the end.\n",
		stableFor, strings.Join(passes, "; "))
	return sb.String()
}
