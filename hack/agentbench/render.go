package main

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// column is one step of a create, measured between two timestamps.
type column struct {
	name string
	of   func(s sample) time.Duration
}

func between(from, to string) func(s sample) time.Duration {
	return func(s sample) time.Duration { return s.at[to].Sub(s.at[from]) }
}

var columns = []column{
	{"API", func(s sample) time.Duration { return s.at["Created"].Sub(s.sent) }},
	{"schedule", between("Created", "Scheduled")},
	// The agent builds the disk and the network at once (agent
	// converge), and a create that ends soon reports its Creating event
	// with RUNNING (agent/creatingreport.go), stamped when that report
	// commits: so both steps are timed from Scheduled, the agent's pickup
	// (the scheduler's commit, the assignment stream, a worker, a libvirt
	// look) included.
	{"pickup + image + disk", between("Scheduled", "DiskReady")},
	{"pickup + network", between("Scheduled", "NetworkReady")},
	{"define + start", defineStart},
	{"status → watch", func(s sample) time.Duration { return s.running.Sub(s.at["Started"]) }},
}

func total(s sample) time.Duration { return s.running.Sub(s.sent) }

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ms(d time.Duration) string {
	if d < 10*time.Millisecond && d > -10*time.Millisecond {
		return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000)
	}
	return fmt.Sprintf("%d ms", d.Round(time.Millisecond).Milliseconds())
}

// stat is p50 or max over a set of durations.
type stat struct {
	name string
	of   func([]time.Duration) time.Duration
}

var stats = []stat{{"p50", median}, {"max", slices.Max[[]time.Duration]}}

func apply(samples []sample, f func(sample) time.Duration) []time.Duration {
	out := make([]time.Duration, len(samples))
	for i, s := range samples {
		out[i] = f(s)
	}
	return out
}

// defineStart is the libvirt part of a create, from the later of disk and
// network ready; the rest is the control plane's.
func defineStart(s sample) time.Duration {
	ready := s.at["NetworkReady"]
	if d := s.at["DiskReady"]; d.After(ready) {
		ready = d
	}
	return s.at["Started"].Sub(ready)
}

func controlPlane(s sample) time.Duration { return total(s) - defineStart(s) }

// overhead is the control plane's overhead for one batch size.
type overhead struct {
	creates            int
	where              string        // "" or what sets the row apart, after its count
	p50, max           time.Duration // create → RUNNING minus the VM's own define + start
	vsRawP50, vsRawMax time.Duration // create → RUNNING minus raw createXML
	defineP50, rawP50  time.Duration // define + start, raw createXML
	samples            []sample
}

func (b *bench) render() string {
	single, warm := merge(b.single), merge(b.warm)
	var sb strings.Builder
	hyp := "?"
	if len(single.samples) > 0 {
		hyp = single.samples[0].hypervisor
	}
	fmt.Fprintf(&sb, "`go run ./hack/agentbench -reps %d -concurrency %d` (as root) — a real `minicloudd all-in-one` (embedded etcd, API, scheduler, agent, metadata) as a child process, %s, guests under %s, the tiny image (direct kernel + initrd boot, flavor 1 vCPU / 256 MiB / 1 GiB). 2 cores shared with other work; load average %s before the run, %s after; the run took %s; measured %s.\n\n",
		b.opts.reps, b.opts.concurrency, libvirtVersion(), strings.ToUpper(hyp), b.loadBefore, b.loadAfter,
		b.elapsed.Round(time.Second), b.started.UTC().Format("2006-01-02 15:04 UTC"))

	sb.WriteString("| creates at once | | ")
	for _, c := range columns {
		sb.WriteString(c.name + " | ")
	}
	sb.WriteString("**create → RUNNING** | **control plane** (create → RUNNING − define + start) | raw libvirt `createXML` | create → RUNNING − raw |\n|---|---|")
	sb.WriteString(strings.Repeat("---:|", len(columns)+4) + "\n")

	row := func(label, statName string, vals []time.Duration, rest ...string) {
		fmt.Fprintf(&sb, "| %s | %s | ", label, statName)
		for _, v := range vals {
			sb.WriteString(ms(v) + " | ")
		}
		fmt.Fprintf(&sb, "**%s** | **%s** | %s | %s |\n", rest[0], rest[1], rest[2], rest[3])
	}
	if len(b.cold.samples) == 1 {
		s := b.cold.samples[0]
		var vals []time.Duration
		for _, c := range columns {
			vals = append(vals, c.of(s))
		}
		row("1, image not cached yet", "", vals, ms(total(s)), ms(controlPlane(s)), "", "")
	}
	type group struct {
		label, where string
		n            int
		r            round
	}
	groups := []group{{label: fmt.Sprintf("1 (%d rounds)", len(b.single)), n: 1, r: single}}
	if len(warm.samples) > 0 {
		groups = append(groups, group{fmt.Sprintf("1, network already on the host (%d rounds)", len(b.warm)), ", network already on the host", 1, warm})
	}
	groups = append(groups, group{label: fmt.Sprint(b.opts.concurrency), n: b.opts.concurrency, r: b.concurrent})
	var overs []overhead
	for _, g := range groups {
		o := overhead{creates: g.n, where: g.where, samples: g.r.samples}
		for _, st := range stats {
			var vals []time.Duration
			for _, c := range columns {
				vals = append(vals, st.of(apply(g.r.samples, c.of)))
			}
			tot, cp, raw := st.of(apply(g.r.samples, total)), st.of(apply(g.r.samples, controlPlane)), st.of(g.r.raw)
			row(g.label, st.name, vals, ms(tot), ms(cp), ms(raw), ms(tot-raw))
			if st.name == "p50" {
				o.p50, o.vsRawP50 = cp, tot-raw
				o.defineP50, o.rawP50 = st.of(apply(g.r.samples, defineStart)), raw
			} else {
				o.max, o.vsRawMax = cp, tot-raw
			}
		}
		overs = append(overs, o)
	}
	sb.WriteString("\n**Control plane overhead over raw libvirt**, per VM (create → RUNNING minus the VM's own define + start): ")
	for i, o := range overs {
		if i > 0 {
			sb.WriteString("; ")
		}
		fmt.Fprintf(&sb, "p50 %s, max %s with %d create(s) at once%s", ms(o.p50), ms(o.max), o.creates, o.where)
	}
	verdict := func(met bool) string {
		if met {
			return "**met**"
		}
		return "**NOT met**"
	}
	// Issue 15's targets: the overhead of the concurrent batch under
	// 100 ms at p50, and a single create within 2 % of raw libvirt (its
	// create → RUNNING against raw createXML at p50, and its overhead
	// against its own define + start, which the shared machine disturbs
	// less).
	one, many := overs[0], overs[len(overs)-1]
	pct := func(d, of time.Duration) float64 { return 100 * float64(d) / float64(max(of, 1)) }
	fmt.Fprintf(&sb, ". Targets (issue 15): < 100 ms at p50 with %d at once: %s; one create within 2 %% of raw libvirt: create → RUNNING %+.1f %% of raw `createXML` at p50 (%s), the overhead %.1f %% of its own define + start: %s.\n",
		many.creates, verdict(many.p50 < 100*time.Millisecond), pct(one.vsRawP50, one.rawP50), verdict(pct(one.vsRawP50, one.rawP50) <= 2),
		pct(one.p50, one.defineP50), verdict(pct(one.p50, one.defineP50) <= 2))
	if len(overs) > 2 {
		// The same 2 % judged on the usual case: a network that already
		// has a VM on the host, so the create makes no bridge.
		w := overs[1]
		fmt.Fprintf(&sb, "The same target with the network already on the host (one other VM kept on it, so no bridge to make): create → RUNNING %+.1f %% of raw `createXML` at p50 (%s), the overhead %s at p50, %.1f %% of its own define + start: %s.\n",
			pct(w.vsRawP50, w.rawP50), verdict(pct(w.vsRawP50, w.rawP50) <= 2), ms(w.p50), pct(w.p50, w.defineP50), verdict(pct(w.p50, w.defineP50) <= 2))
	}
	sb.WriteString("The libvirt part against raw libvirt: define + start (the guest services told, the domain defined — libvirt writes its persistent config — looked up and started) vs one `createXML` of the same XML at p50: ")
	for i, o := range overs {
		if i > 0 {
			sb.WriteString("; ")
		}
		fmt.Fprintf(&sb, "%s vs %s with %d at once%s", ms(o.defineP50), ms(o.rawP50), o.creates, o.where)
	}
	sb.WriteString(". ")
	for i, o := range overs {
		step, d := largestStep(o.samples)
		if i > 0 {
			sb.WriteString("; ")
		} else {
			sb.WriteString("Largest control-plane step at p50: ")
		}
		fmt.Fprintf(&sb, "%s (%s) with %d at once%s", step, ms(d), o.creates, o.where)
	}
	sb.WriteString(". The last column subtracts the raw batch of the same run instead; on a shared, loaded machine libvirt's own time varies by seconds between batches, which that difference inherits, so the per-VM figure is the one the target is judged on.\n\n")

	fmt.Fprintf(&sb, "How to read it. Each row's columns are the steps of a create, taken from the VM's event log (`minicloud vm events`): API = client sends CreateVM → `Created` (API); schedule → `Scheduled` (scheduler: host chosen, address allocated; its commit is in the next columns); pickup + image + disk = `Scheduled` → `DiskReady` (the scheduler's commit, the assignment stream, the agent's work queue and first look at libvirt, then the image in the host's cache by digest and the qcow2 overlay made); pickup + network = `Scheduled` → `NetworkReady` (the same pickup, then bridge, tap, anti-spoofing rules), made at the same time as the disk; a create that ends within the agent's CREATING report delay (2 s) sends its `Creating` event with its RUNNING report, one commit, so `Creating` no longer marks the pickup; define + start = the later of `DiskReady` and `NetworkReady` → `Started` (DHCP/DNS/metadata told, domain defined and started; libvirt returns once QEMU runs the guest); status → watch = the agent's RUNNING report through the API and etcd until the client's `WatchVMs` delivers it. create → RUNNING is client send → RUNNING delivered. Every timestamp comes from the same host clock. p50 and max are per column, so a row's columns need not add up to its total.\n\n")
	fmt.Fprintf(&sb, "The raw baseline, in the same run: `virsh dumpxml --inactive` of the first VM's domain, given its own name, UUID (SMBIOS too), MAC, console file, a qcow2 overlay over the same cached image and a tap made like the agent's (so `managed='no'` still holds), then one `createXML` call each (what `virsh create` does) for 1 and for %d at once, on a libvirt connection opened before the clock starts, as the agent's is; disks and taps are made before the clock starts too, so it is libvirt and QEMU alone (until 2026-12-03 the harness timed `virsh create` itself, whose process start and connection, 20–30 ms here, counted against raw libvirt and flattered the control plane). Each minicloud batch is deleted before its raw batch runs, so neither competes with the other's booting guests. The agent reconciles up to 16 VMs at once (its default; with the earlier 4, the 5th to 10th of ten creates waited in the pickup for a worker while four sat in define + start). The first row is the first VM of the run, whose image the agent still has to download from the image service and verify. Each round of the row *1 (N rounds)* deletes its VM, the network's last on the host, and the agent removes the bridge with it, so every one of those creates is a network's first VM on the host and makes its bridge; in the row *1, network already on the host* one other VM (`%s`) stays RUNNING on the network through all its rounds, raw ones included, so each create finds the bridge there (checked before each round), the usual case in a cloud; the kept VM is deleted afterwards and the bridge must go with it. Rounds disturbed by the shared machine (a minicloud VM whose event log lacks a step because the agent's retry finished it, or a failed raw batch — e.g. libvirtd restarted by another test) were repeated: %d this run.\n\n", b.opts.concurrency, keptVM, b.repeated)
	fmt.Fprintf(&sb, "Disks: all %d VM disks were checked with `qemu-img info` while running: each is a qcow2 overlay whose backing file is the agent's cached image (`%s`), at most %s allocated against the image's %s — an overlay, never a copy. Clean-up: every VM, the kept one included, was deleted through the API and waited for; libvirt (`virsh list --all`), the kernel's links (`ip link`) and the agent's directory show no domain, tap or VM directory left, the network's bridge went with the last VM, and the raw domains (transient) were destroyed and their taps removed.\n",
		b.overlays, strings.TrimPrefix(b.backing, b.cloud.dataDir+"/"), kib(b.overlayMax), kib(b.imageSize))
	return sb.String()
}

// merge is the samples and raw latencies of rounds as one.
func merge(rounds []round) round {
	var m round
	for _, r := range rounds {
		m.samples = append(m.samples, r.samples...)
		m.raw = append(m.raw, r.raw...)
	}
	return m
}

// largestStep is the control-plane column with the largest p50.
func largestStep(samples []sample) (string, time.Duration) {
	var name string
	var most time.Duration
	for _, c := range columns {
		if c.name == "define + start" {
			continue
		}
		if d := median(apply(samples, c.of)); d > most {
			name, most = c.name, d
		}
	}
	return name, most
}

func kib(n int64) string { return fmt.Sprintf("%d KiB", n/1024) }

func libvirtVersion() string {
	out, err := virsh(context.Background(), "version")
	if err != nil {
		return "libvirt"
	}
	var parts []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "Using library: ") {
			parts = append(parts, strings.TrimPrefix(line, "Using library: "))
		}
		if strings.HasPrefix(line, "Running hypervisor: ") {
			parts = append(parts, strings.TrimPrefix(line, "Running hypervisor: "))
		}
	}
	if len(parts) == 0 {
		return "libvirt"
	}
	return strings.Join(parts, ", ")
}
