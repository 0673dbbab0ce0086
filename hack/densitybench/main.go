// Command densitybench measures the agent's per-pass cost as its host fills
// (issue 15, section 4): it runs BenchmarkDensity of package agent (an
// agent over the fake hypervisor, network and API, with the real guest
// services, holding 10, 50 and 1,000 running VMs) and rewrites the
// "density" section of docs/benchmarks.md with the p50 and p99 of one
// reconcile pass and of one publish, in wall and in CPU time, and the load
// average before and after.
//
//	go run ./hack/densitybench [-ops 200] [-docs docs/benchmarks.md]
//
// Needs no root and no libvirt: nothing boots. The same measure with real
// guests (10 and 50 tiny VMs under libvirt, and an agent restart) is
// `go run ./hack/agentbench -density 10,50`, which owns the real
// all-in-one harness. The benchmark runs under
// nice -n 10 (the machine is shared); takes about a minute.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/minicloud/minicloud/hack/benchdoc"
)

func main() {
	ops := flag.Int("ops", 200, "measured operations per VM count and kind (the benchmark's b.N)")
	docs := flag.String("docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	timeout := flag.Duration("timeout", 10*time.Minute, "bound on the benchmark run")
	flag.Parse()
	if *ops < 100 {
		log.Fatal("densitybench: -ops must be at least 100 (a p99 needs them)")
	}
	if err := run(*ops, *docs, *timeout); err != nil {
		log.Fatalf("densitybench: %v", err)
	}
}

// row is one sub-benchmark's result.
type row struct {
	vms            int
	op             string
	p50, p99       float64 // wall time, µs
	cpuP50, cpuP99 float64 // CPU time of the op's thread, µs
}

func run(ops int, docs string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	loadBefore, start := benchdoc.LoadAverages(), time.Now()
	args := []string{"-n", "10", "go", "test", "-count=1", "-run", "^$", "-bench", "^BenchmarkDensity$",
		"-benchtime", fmt.Sprintf("%dx", ops), "./agent/"}
	cmd := exec.CommandContext(ctx, "nice", args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	took, loadAfter := time.Since(start), benchdoc.LoadAverages()
	rows, err := parse(out)
	if err != nil {
		return err
	}
	table := render(rows, ops, loadBefore, loadAfter, took)
	fmt.Println(table)
	if docs == "" {
		return nil
	}
	if err := benchdoc.RewriteSection(docs, "density", table); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "densitybench: rewrote the density section of %s\n", docs)
	return nil
}

var (
	benchLine = regexp.MustCompile(`^BenchmarkDensity/vms=(\d+)/(\w+)-\d+\s+\d+\s+[\d.]+ ns/op\s+(.*)$`)
	metric    = regexp.MustCompile(`([\d.]+) (\S+)`)
)

// parse reads the benchmark's lines; its metrics come in any order (go test
// sorts them by unit).
func parse(out []byte) ([]row, error) {
	var rows []row
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		r := row{op: m[2]}
		r.vms, _ = strconv.Atoi(m[1])
		for _, mm := range metric.FindAllStringSubmatch(m[3], -1) {
			v, _ := strconv.ParseFloat(mm[1], 64)
			switch mm[2] {
			case "p50-µs":
				r.p50 = v
			case "p99-µs":
				r.p99 = v
			case "p50-cpu-µs":
				r.cpuP50 = v
			case "p99-cpu-µs":
				r.cpuP99 = v
			}
		}
		rows = append(rows, r)
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("no BenchmarkDensity result in the output:\n%s", out)
	}
	return rows, nil
}

func render(rows []row, ops int, loadBefore, loadAfter string, took time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "`go run ./hack/densitybench -ops %d` — `BenchmarkDensity` (agent/density_bench_test.go) under `nice -n 10`: one agent over the fake hypervisor, network and API (agent/hypervisor/hypervisortest, agent/network/networktest), with the real guest services (metadata directory, DHCP leases, DNS zone; not serving, so no root), holding N running VMs on one /16 network. *reconcile* is one reconcile pass of a running VM (what the periodic resync or a domain event runs; it publishes the guests); *publish* is one spec write (a new tag) and the publish its assignment event makes. Wall time, and CPU time: the thread's CPU clock around the op, its goroutine locked to the thread, as the agent times its passes (agent/passcpu.go). %d of each per VM count, the VMs taken in turn. 2 cores shared with other work; load average %s before the run, %s after; the run took %s; measured %s.\n\n",
		ops, ops, loadBefore, loadAfter, took.Round(time.Second), time.Now().UTC().Format("2006-01-02 15:04 MST"))
	b.WriteString("| VMs on the host | reconcile pass p50 | p99 | CPU p50 | CPU p99 | publish p50 | p99 | CPU p50 | CPU p99 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	byVMs := map[int]map[string]row{}
	var order []int
	for _, r := range rows {
		if byVMs[r.vms] == nil {
			byVMs[r.vms] = map[string]row{}
			order = append(order, r.vms)
		}
		byVMs[r.vms][r.op] = r
	}
	for _, n := range order {
		rc, pb := byVMs[n]["reconcile"], byVMs[n]["publish"]
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", n, us(rc.p50), us(rc.p99), us(rc.cpuP50), us(rc.cpuP99),
			us(pb.p50), us(pb.p99), us(pb.cpuP50), us(pb.cpuP99))
	}
	return b.String()
}

// us prints a duration given in µs with a sensible unit.
func us(v float64) string {
	switch {
	case v == 0:
		return "—"
	case v >= 1000:
		return fmt.Sprintf("%.1f ms", v/1000)
	default:
		return fmt.Sprintf("%.0f µs", v)
	}
}
