// Command labbench measures the multi-host lab (package lab, docs/lab.md)
// on its own lab, named, placed and addressed apart from `make lab`'s and
// the lab tests' (mclb, /var/lib/minicloud-labbench, 10.252.0.0/24):
//
//   - N creates of the tiny image at once spread over 3 hosts by the
//     scheduler, and N at once pinned to one host, in alternating rounds:
//     create → RUNNING p50, p90, p99 and the whole batch's time;
//   - ping RTT and TCP throughput between two guests of one network on one
//     host, and on two hosts through VXLAN.
//
// The tiny guest runs no user commands, so the network guests are network
// namespaces that take over the port of a real VM: the VM is created
// through the API (its address, MAC, port record and every host's VXLAN
// forwarding and allowlist entries are the real ones), its domain is then
// powered off, and a veth whose guest end carries the VM's MAC and address
// is attached to the host's bridge with the same anti-spoofing filter the
// agent gives a tap (network.PortSpec.Existing). The frames cross exactly
// the bridge, nftables filters and VXLAN device a VM's would, without the
// TCG-emulated virtio NIC.
//
// It rewrites the "lab" section of docs/benchmarks.md, takes the lab down
// (lab.Down) and fails if anything of it is left.
//
//	go run ./hack/labbench [-n 30] [-rounds 2] [-docs docs/benchmarks.md]
//
// Needs root (namespaces, bridges, libvirtd) and hack/setup-host.sh's
// packages; takes a few minutes.
package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/linux"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/hack/benchdoc"
	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// The benchmark's lab, apart from `make lab` (mclab, 10.250.0.0/24) and the
// lab tests (mclt, 10.251.0.0/24).
const (
	benchLabName   = "mclb"
	benchLabDir    = "/var/lib/minicloud-labbench"
	benchLabSubnet = "10.252.0.0/24"
	benchHosts     = 3
)

func main() {
	var o options
	flag.IntVar(&o.n, "n", 30, "VMs created at once in each create batch")
	flag.IntVar(&o.rounds, "rounds", 2, "rounds of (a batch spread over the hosts, a batch on host1)")
	flag.DurationVar(&o.timeout, "timeout", 20*time.Minute, "bound on the whole run, clean-up excluded")
	flag.StringVar(&o.docs, "docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	flag.DurationVar(&o.tcpTime, "tcp-time", 5*time.Second, "duration of each TCP throughput run")
	flag.IntVar(&o.pings, "pings", 20, "echo requests per ping run")
	// Helper modes: the harness re-runs itself inside a namespace.
	port := flag.String("ensure-port", "", "internal: JSON network.PortSpec to adopt in this network namespace")
	serve := flag.String("tcp-sink", "", "internal: accept one TCP connection on ADDR and discard what it sends")
	send := flag.String("tcp-send", "", "internal: send to ADDR for -tcp-time and print bytes/second")
	pingTo := flag.String("ping", "", "internal: send -pings ICMP echoes of -ping-size bytes (DF set) to ADDR, print each RTT in µs")
	pingSize := flag.Int("ping-size", 56, "internal: echo payload bytes")
	flag.Parse()
	var err error
	switch {
	case *port != "":
		err = ensurePort(*port)
	case *serve != "":
		err = tcpSink(*serve)
	case *send != "":
		err = tcpSend(*send, o.tcpTime)
	case *pingTo != "":
		err = pingEchoes(*pingTo, o.pings, *pingSize)
	default:
		if o.n < 1 || o.rounds < 1 {
			log.Fatal("labbench: -n and -rounds must be at least 1")
		}
		if os.Geteuid() != 0 {
			log.Fatal("labbench: needs root (namespaces, bridges, libvirtd): run it with sudo")
		}
		err = run(o)
	}
	if err != nil {
		log.Fatalf("labbench: %v", err)
	}
}

type options struct {
	n, rounds      int
	timeout        time.Duration
	docs           string
	tcpTime        time.Duration
	pings          int
	exe, loadStart string
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}

func run(o options) (err error) {
	start := time.Now()
	o.loadStart = loadavg()
	if o.exe, err = os.Executable(); err != nil {
		return err
	}
	tiny, err := filepath.Abs("images/out/tiny")
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(tiny, "disk.qcow2")); err != nil {
		return fmt.Errorf("tiny image: %w (hack/images/build-tiny.sh builds it)", err)
	}
	binDir, err := os.MkdirTemp("", "labbench-bin-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(binDir)
	// QEMU and the hosts' processes run the binaries from here.
	if err := os.Chmod(binDir, 0o755); err != nil {
		return err
	}
	for _, c := range []string{"minicloud", "minicloudd"} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(binDir, c), "./cmd/"+c).CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %v: %s", c, err, out)
		}
	}
	if old, err := lab.Load(benchLabDir, os.Stderr); err == nil {
		log.Printf("removing the lab of an earlier run in %s", benchLabDir)
		if err := old.Down(context.Background()); err != nil {
			return fmt.Errorf("remove the lab of an earlier run: %w", err)
		}
	}
	l, err := lab.New(lab.Config{
		Name: benchLabName, Dir: benchLabDir, Hosts: benchHosts,
		Subnet: netip.MustParsePrefix(benchLabSubnet), BinDir: binDir,
		Images: map[string]string{"tiny": tiny}, NoVMs: true,
		// Room for every VM of a batch on one host: the default
		// capacities hold only 3-5 one-vCPU VMs.
		Capacity: &lab.Capacity{VCPUs: 2 * o.n, MemoryMiB: 512 * int64(o.n), DiskGiB: 4 * int64(o.n)},
	}, os.Stderr)
	if err != nil {
		return err
	}
	// Namespace guests of a run that was killed (lab.Down of its lab, below,
	// removes the rest).
	for i := 1; i <= 3; i++ {
		if err := (&nsGuest{ns: fmt.Sprintf("%s-g%d", benchLabName, i)}).remove(); err != nil {
			return err
		}
	}
	var guests []*nsGuest
	defer func() {
		for _, g := range guests {
			err = errors.Join(err, g.remove())
		}
		if derr := l.Down(context.Background()); derr != nil {
			err = errors.Join(err, fmt.Errorf("lab down: %w", derr))
		}
		leaks := l.Leftovers(vmIDs.list())
		if ents, err := os.ReadDir("/run/netns"); err == nil {
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), benchLabName+"-g") {
					leaks = append(leaks, "namespace "+e.Name())
				}
			}
		}
		if len(leaks) > 0 {
			err = errors.Join(err, fmt.Errorf("the lab left behind: %s", strings.Join(leaks, "; ")))
		}
	}()
	// Ctrl-C or a timeout ends the run early; the deferred clean-up runs.
	sctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(sctx, o.timeout)
	defer cancel()
	upStart := time.Now()
	if err := l.Up(ctx); err != nil {
		return fmt.Errorf("lab up: %w", err)
	}
	upTime := time.Since(upStart)

	// Every host's agent fetches the image from the API on its first VM:
	// one VM per host first, so neither batch pays for that and the
	// batches differ only in where their VMs go.
	for _, h := range l.HostNames() {
		if _, err := createBatch(ctx, l, 1, "warm-"+h, h); err != nil {
			return fmt.Errorf("warm-up on %s: %w", h, err)
		}
	}
	// Rounds alternate the order (spread, one host, one host, spread,
	// ...), so a load that drifts during the run weighs on both kinds alike.
	var batches []*batch
	for r := 1; r <= o.rounds; r++ {
		kinds := []string{"", "host1"}
		if r%2 == 0 {
			kinds = []string{"host1", ""}
		}
		for _, host := range kinds {
			tag := fmt.Sprintf("r%d-%s", r, cmp.Or(host, "spread"))
			b, err := createBatch(ctx, l, o.n, tag, host)
			if err != nil {
				return fmt.Errorf("batch %s: %w", tag, err)
			}
			b.round, b.host = r, host
			batches = append(batches, b)
		}
	}
	nets, g, err := networkBench(ctx, l, o)
	guests = g
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	for _, g := range guests {
		if err := g.remove(); err != nil {
			return err
		}
	}
	guests = nil
	if err := deleteVMs(ctx, l, "net-"); err != nil {
		return err
	}
	body := render(o, upTime, batches, nets, time.Since(start))
	fmt.Print(body)
	if o.docs != "" {
		if err := benchdoc.RewriteSection(o.docs, "lab", body); err != nil {
			return err
		}
		log.Printf("wrote the lab section of %s", o.docs)
	}
	return nil
}

// idSet collects the id of every VM the run made, for the leak check.
type idSet struct {
	mu  sync.Mutex
	ids map[string]bool
}

func (s *idSet) add(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ids == nil {
		s.ids = map[string]bool{}
	}
	s.ids[id] = true
}

func (s *idSet) list() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for id := range s.ids {
		out = append(out, id)
	}
	return out
}

var vmIDs idSet

// batch is one create batch's result.
type batch struct {
	round    int
	host     string // "": wherever the scheduler chose
	n        int
	perHost  map[string]int
	latency  []time.Duration // create sent → RUNNING seen, sorted
	total    time.Duration   // first create sent → last RUNNING seen
	deleteIn time.Duration
}

// createBatch creates n tiny VMs at once (on host, or wherever the
// scheduler puts them), waits until all are RUNNING, then deletes them and
// waits until they are gone.
func createBatch(ctx context.Context, l *lab.Lab, n int, tag, host string) (*batch, error) {
	c, err := l.Client(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	// A batch (30 by default) plus the lab's own VMs is more than the
	// default quota of a project (20 VMs): the bench measures the cloud,
	// not the quota.
	unlimited := int64(-1)
	if _, err := c.Quotas.SetQuota(ctx, &minicloudv1.SetQuotaRequest{Limits: &minicloudv1.QuotaLimits{
		Instances: &unlimited, Vcpus: &unlimited, MemoryMib: &unlimited, DiskGib: &unlimited,
	}}); err != nil {
		return nil, fmt.Errorf("lift the quota of the bench's project: %w", err)
	}
	prefix := "bench-" + tag + "-"
	sent := make([]time.Time, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("%s%02d", prefix, i)
			sent[i] = time.Now()
			var vm *minicloudv1.VM
			vm, errs[i] = c.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{
				Name: name, RequestId: "labbench-" + name,
				Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny", TargetHost: host},
			})
			if vm != nil {
				vmIDs.add(vm.GetMeta().GetId())
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	// One ListVMs every 250 ms: create → RUNNING is tens of seconds here,
	// so the poll's resolution is noise against it, and 30 watchers would
	// load the API more than the creates do.
	b := &batch{n: n, perHost: map[string]int{}}
	running := map[string]time.Time{}
	for len(running) < n {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%d of %d VMs RUNNING: %w", len(running), n, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
		resp, err := c.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{})
		if err != nil {
			log.Printf("list VMs: %v (retrying)", err)
			continue
		}
		now := time.Now()
		for _, v := range resp.Vms {
			name := v.GetMeta().GetName()
			if !strings.HasPrefix(name, prefix) || !running[name].IsZero() {
				continue
			}
			switch v.GetStatus().GetPhase() {
			case minicloudv1.VMPhase_VM_PHASE_RUNNING:
				running[name] = now
				b.perHost[v.GetStatus().GetHost()]++
			case minicloudv1.VMPhase_VM_PHASE_ERROR:
				return nil, fmt.Errorf("%s in ERROR on %q: %s", name, v.GetStatus().GetHost(), v.GetStatus().GetMessage())
			}
		}
	}
	var last time.Time
	for i := range n {
		at := running[fmt.Sprintf("%s%02d", prefix, i)]
		b.latency = append(b.latency, at.Sub(sent[i]))
		if at.After(last) {
			last = at
		}
	}
	slices.Sort(b.latency)
	b.total = last.Sub(t0)
	log.Printf("batch %s (host %q): %d RUNNING in %s, per host %v", tag, host, n, b.total.Round(time.Millisecond), b.perHost)
	del := time.Now()
	if err := deleteVMs(ctx, l, prefix); err != nil {
		return nil, err
	}
	b.deleteIn = time.Since(del)
	return b, nil
}

// deleteVMs deletes every VM whose name starts with prefix and waits until
// the API has none left.
func deleteVMs(ctx context.Context, l *lab.Lab, prefix string) error {
	c, err := l.Client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	for {
		resp, err := c.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{})
		if err != nil {
			return fmt.Errorf("list VMs: %w", err)
		}
		left := 0
		for _, v := range resp.Vms {
			name := v.GetMeta().GetName()
			if !strings.HasPrefix(name, prefix) {
				continue
			}
			left++
			if v.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_DELETING {
				continue
			}
			if _, err := c.VMs.DeleteVM(ctx, &minicloudv1.DeleteVMRequest{Name: name}); err != nil && !errdefs.IsNotFound(err) {
				return fmt.Errorf("delete %s: %w", name, err)
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d VMs %s* not deleted: %w", left, prefix, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(float64(len(d))*p+0.999999) - 1
	return d[max(0, min(i, len(d)-1))]
}

// netResult is one guest pair's measurements.
type netResult struct {
	what                     string
	mtu                      int
	rtt                      []time.Duration // sorted
	vxlanBytes               uint64          // sent by the sender's host's VXLAN devices during the TCP run
	mbits                    float64
	fromHost, toHost, detail string
}

// nsGuest is a network namespace that has taken over a powered-off VM's
// port on its host's bridge.
type nsGuest struct {
	l      *lab.Lab
	ns     string
	host   string
	hostIf string
	vm     string
	ip     netip.Addr
	mtu    int
}

func (g *nsGuest) remove() error {
	if _, err := os.Stat("/run/netns/" + g.ns); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	// Deleting the namespace deletes the veth pair; the port's filter
	// elements go when its VM is deleted (the agent's teardown deletes
	// every port recorded as the VM's).
	if out, err := exec.Command("ip", "netns", "del", g.ns).CombinedOutput(); err != nil {
		return fmt.Errorf("remove namespace %s: %v: %s", g.ns, err, out)
	}
	return nil
}

// networkBench creates VMs net-a1, net-a2 on host1 and net-b1 on host2,
// powers their domains off, puts a namespace guest on each one's port, and
// measures a1 → a2 (one host) and a1 → b1 (through VXLAN).
func networkBench(ctx context.Context, l *lab.Lab, o options) ([]netResult, []*nsGuest, error) {
	c, err := l.Client(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	place := []struct{ name, host string }{{"net-a1", "host1"}, {"net-a2", "host1"}, {"net-b1", "host2"}}
	for _, p := range place {
		vm, err := c.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{
			Name: p.name, RequestId: "labbench-" + p.name,
			Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny", TargetHost: p.host},
		})
		if err != nil {
			return nil, nil, fmt.Errorf("create %s: %w", p.name, err)
		}
		vmIDs.add(vm.GetMeta().GetId())
	}
	var guests []*nsGuest
	for i, p := range place {
		vm, err := l.WaitVM(ctx, p.name, minicloudv1.VMPhase_VM_PHASE_RUNNING, 10*time.Minute)
		if err != nil {
			return nil, guests, err
		}
		// Power the domain off from the host, as a guest shutting itself
		// down would: the agent reports STOPPED and leaves it so, and its
		// port (tap, filter, and the other hosts' entries) stays.
		dom := "mc-" + vm.GetMeta().GetId()
		if out, err := l.Output(ctx, p.host, "virsh", "destroy", dom); err != nil {
			return nil, guests, fmt.Errorf("power off %s on %s: %v: %s", dom, p.host, err, out)
		}
		if _, err := l.WaitVM(ctx, p.name, minicloudv1.VMPhase_VM_PHASE_STOPPED, 3*time.Minute); err != nil {
			return nil, guests, err
		}
		g, err := adoptPort(ctx, l, o, vm, p.host, fmt.Sprintf("%s-g%d", benchLabName, i+1), fmt.Sprintf("mctlb%d", i+1))
		if g != nil {
			guests = append(guests, g)
		}
		if err != nil {
			return nil, guests, fmt.Errorf("namespace guest for %s: %w", p.name, err)
		}
	}
	var out []netResult
	for _, pair := range []struct {
		what string
		a, b *nsGuest
	}{
		{"same host (host1 → host1, one bridge)", guests[0], guests[1]},
		{"across hosts (host1 → host2, VXLAN over the underlay)", guests[0], guests[2]},
	} {
		r, err := measure(ctx, o, pair.a, pair.b)
		if err != nil {
			return nil, guests, fmt.Errorf("%s: %w", pair.what, err)
		}
		r.what = pair.what
		out = append(out, r)
		log.Printf("%s: rtt p50 %s max %s, %.0f Mbit/s", r.what, pct(r.rtt, 0.5), r.rtt[len(r.rtt)-1], r.mbits)
	}
	return out, guests, nil
}

// adoptPort makes namespace ns with an eth0 carrying vm's MAC, address and
// MTU, whose peer (hostIf, in host's network namespace) joins vm's bridge
// with the agent's anti-spoofing filter for that MAC and address.
func adoptPort(ctx context.Context, l *lab.Lab, o options, vm *minicloudv1.VM, host, ns, hostIf string) (*nsGuest, error) {
	addrs := vm.GetStatus().GetAddresses()
	if len(addrs) != 1 {
		return nil, fmt.Errorf("VM %s has %d addresses, want 1", vm.GetMeta().GetName(), len(addrs))
	}
	a := addrs[0]
	ip, err := netip.ParseAddr(a.GetIp())
	if err != nil {
		return nil, err
	}
	mtu := int(a.GetMtu())
	if mtu == 0 {
		mtu = 1500
	}
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", ns, err, out)
	}
	g := &nsGuest{l: l, ns: ns, host: host, hostIf: hostIf, vm: vm.GetMeta().GetName(), ip: ip, mtu: mtu}
	hostNS := "/run/netns/" + benchLabName + "-" + host
	steps := [][]string{
		{"nsenter", "--net=" + hostNS, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", "/run/netns/" + ns},
		{"ip", "-n", ns, "link", "set", "eth0", "address", a.GetMac(), "mtu", strconv.Itoa(mtu)},
		{"ip", "-n", ns, "addr", "add", fmt.Sprintf("%s/%d", ip, a.GetPrefixLength()), "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, s[0], s[1:]...).CombinedOutput(); err != nil {
			return g, fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	mac, err := net.ParseMAC(a.GetMac())
	if err != nil {
		return g, err
	}
	spec, err := json.Marshal(network.PortSpec{
		VMID: vm.GetMeta().GetId(), TapName: hostIf, Bridge: a.GetBridge(),
		MAC: mac, IP: ip, MTU: mtu, Existing: true,
	})
	if err != nil {
		return g, err
	}
	cmd, err := l.Command(ctx, host, o.exe, "-ensure-port", string(spec))
	if err != nil {
		return g, err
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return g, fmt.Errorf("adopt port %s on %s: %v: %s", hostIf, host, err, out)
	}
	return g, nil
}

// ensurePort runs inside a lab host: the agent's own network manager
// adopts the veth as a port of the VM, filter first.
func ensurePort(specJSON string) error {
	var spec network.PortSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		return err
	}
	return linux.New().EnsurePort(context.Background(), spec)
}

// vxlanTxBytes sums the bytes sent by every VXLAN device of g's host.
func vxlanTxBytes(ctx context.Context, g *nsGuest) (uint64, error) {
	out, err := exec.CommandContext(ctx, "ip", "-n", benchLabName+"-"+g.host, "-s", "-j", "link", "show", "type", "vxlan").Output()
	if err != nil {
		return 0, fmt.Errorf("VXLAN devices of %s: %w", g.host, err)
	}
	var links []struct {
		Stats struct {
			TX struct {
				Bytes uint64 `json:"bytes"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		return 0, fmt.Errorf("VXLAN devices of %s: %w", g.host, err)
	}
	var n uint64
	for _, l := range links {
		n += l.Stats.TX.Bytes
	}
	return n, nil
}

// nsPing runs pingEchoes in g's namespace: count echoes to dst, every one
// answered, their RTTs sorted.
func nsPing(ctx context.Context, o options, g *nsGuest, dst netip.Addr, count, size int) ([]time.Duration, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", g.ns, o.exe, "-ping", dst.String(),
		"-pings", strconv.Itoa(count), "-ping-size", strconv.Itoa(size)).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("ping %s from %s (%d bytes): %v: %s", dst, g.ns, size, err, out)
	}
	var rtts []time.Duration
	for _, f := range strings.Fields(string(out)) {
		us, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("ping output %q", out)
		}
		rtts = append(rtts, time.Duration(us)*time.Microsecond)
	}
	if len(rtts) != count {
		return nil, fmt.Errorf("ping %s from %s: %d of %d replies", dst, g.ns, len(rtts), count)
	}
	slices.Sort(rtts)
	return rtts, nil
}

// pingEchoes sends count ICMP echoes with DF set, 200 ms apart, each
// waiting for its reply (5 s at most), and prints each RTT in µs. (The
// machine has no ping(8); a Go program in the namespace also keeps both
// rows' tool overhead the same.)
func pingEchoes(dst string, count, size int) error {
	ip, err := netip.ParseAddr(dst)
	if err != nil {
		return err
	}
	for i := range count {
		if i > 0 {
			time.Sleep(200 * time.Millisecond)
		}
		rtt, err := netnstest.Echo(ip, size, 5*time.Second)
		if err != nil {
			return fmt.Errorf("echo %d: %w", i+1, err)
		}
		fmt.Println(rtt.Microseconds())
	}
	return nil
}

func measure(ctx context.Context, o options, a, b *nsGuest) (netResult, error) {
	r := netResult{fromHost: a.host, toHost: b.host, mtu: min(a.mtu, b.mtu)}
	// Warm-up: ARP (answered by the bridge's neighbour entries across
	// hosts) and the FDB, so the first echo does not count them.
	if _, err := nsPing(ctx, o, a, b.ip, 2, 56); err != nil {
		return r, err
	}
	rtts, err := nsPing(ctx, o, a, b.ip, o.pings, 56)
	if err != nil {
		return r, err
	}
	r.rtt = rtts
	// A payload that needs the whole MTU must pass unfragmented (DF set).
	if _, err := nsPing(ctx, o, a, b.ip, 1, a.mtu-28); err != nil {
		return r, fmt.Errorf("full-MTU echo (%d-byte payload, DF): %w", a.mtu-28, err)
	}

	addr := netip.AddrPortFrom(b.ip, 5201).String()
	sink := exec.CommandContext(ctx, "ip", "netns", "exec", b.ns, o.exe, "-tcp-sink", addr)
	sinkOut, err := sink.StdoutPipe()
	if err != nil {
		return r, err
	}
	sink.Stderr = os.Stderr
	if err := sink.Start(); err != nil {
		return r, err
	}
	defer func() { _ = sink.Process.Kill(); _ = sink.Wait() }()
	// The sink prints "listening" once it accepts connections.
	if line, err := bufio.NewReader(sinkOut).ReadString('\n'); err != nil || !strings.HasPrefix(line, "listening") {
		return r, fmt.Errorf("TCP sink in %s did not start: %q %v", b.ns, line, err)
	}
	before, err := vxlanTxBytes(ctx, a)
	if err != nil {
		return r, err
	}
	sendStart := time.Now()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", a.ns, o.exe, "-tcp-send", addr, "-tcp-time", o.tcpTime.String()).Output()
	if err != nil {
		return r, fmt.Errorf("TCP send %s → %s: %w", a.ns, addr, err)
	}
	el := time.Since(sendStart)
	bps, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
	if err != nil {
		return r, fmt.Errorf("TCP send output %q: %w", out, err)
	}
	r.mbits = bps * 8 / 1e6
	after, err := vxlanTxBytes(ctx, a)
	if err != nil {
		return r, err
	}
	// Proof of the path: across hosts the stream left host1 through its
	// VXLAN device; on one host it did not touch it.
	r.vxlanBytes = after - before
	sent := bps * el.Seconds() * 0.9
	switch {
	case a.host != b.host && float64(r.vxlanBytes) < sent:
		return r, fmt.Errorf("only %d bytes left %s through VXLAN while the stream sent about %.0f", r.vxlanBytes, a.host, sent)
	case a.host == b.host && float64(r.vxlanBytes) > sent/100:
		return r, fmt.Errorf("%d bytes left %s through VXLAN for a stream between two of its own guests", r.vxlanBytes, a.host)
	}
	return r, nil
}

// tcpSink accepts one connection and reads it to the end.
func tcpSink(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Println("listening")
	conn, err := ln.Accept()
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = io.Copy(io.Discard, conn)
	return err
}

// tcpSend writes to addr for d and prints the bytes per second the
// receiver acknowledged (the count excludes what sat in buffers when the
// connection was closed: close waits until the peer has read it all).
func tcpSend(addr string, d time.Duration) error {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	buf := make([]byte, 128<<10)
	var n int64
	start := time.Now()
	for time.Since(start) < d {
		w, err := conn.Write(buf)
		n += int64(w)
		if err != nil {
			return err
		}
	}
	// Half-close and wait for the sink's close: every byte was read.
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, conn)
	el := time.Since(start)
	conn.Close()
	fmt.Printf("%.0f\n", float64(n)/el.Seconds())
	return nil
}

func us(d time.Duration) string { return fmt.Sprintf("%d µs", d.Microseconds()) }

func ms(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }

func render(o options, up time.Duration, batches []*batch, nets []netResult, took time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "`go run ./hack/labbench -n %d -rounds %d` (as root) — its own lab (`%s`, %s, %s): %d hosts, each a network + mount namespace with its own libvirtd and `minicloudd agent`, a 3-member etcd with TLS, 2 API replicas, 2 schedulers (docs/lab.md); up in %s. Guests under TCG, the tiny image, flavor tiny (1 vCPU / 256 MiB / 1 GiB); every host offers %d vCPUs and %d MiB (`lab.Config.Capacity`) so one host can take a whole batch. 2 cores shared with other work (the integrator's test suite, other helpers' labs); load average %s before the run, %s after; the run took %s; measured %s.\n\n",
		o.n, o.rounds, benchLabName, benchLabDir, benchLabSubnet, benchHosts, up.Round(time.Second), 2*o.n, 512*o.n, o.loadStart, loadavg(), took.Round(time.Second), time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	b.WriteString("| round | batch | VMs per host | create → RUNNING p50 | p90 | p99 | **whole batch** (first create → last RUNNING) | delete all → gone |\n|---:|---|---|---:|---:|---:|---:|---:|\n")
	for _, x := range batches {
		what := fmt.Sprintf("%d at once, spread by the scheduler over %d hosts", x.n, benchHosts)
		if x.host != "" {
			what = fmt.Sprintf("%d at once, all on %s (`target_host`)", x.n, x.host)
		}
		var hosts []string
		for h, n := range x.perHost {
			hosts = append(hosts, fmt.Sprintf("%s %d", h, n))
		}
		slices.Sort(hosts)
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | **%s** | %s |\n", x.round, what, strings.Join(hosts, ", "),
			ms(pct(x.latency, 0.5)), ms(pct(x.latency, 0.9)), ms(pct(x.latency, 0.99)), ms(x.total), ms(x.deleteIn))
	}
	for _, k := range []struct{ what, host string }{{"spread over the hosts", ""}, {"on one host", "host1"}} {
		var totals, p50s []string
		for _, x := range batches {
			if x.host == k.host {
				totals = append(totals, ms(x.total))
				p50s = append(p50s, ms(pct(x.latency, 0.5)))
			}
		}
		fmt.Fprintf(&b, "\n%d at once %s: whole batch %s, p50 %s.", o.n, k.what, strings.Join(totals, " and "), strings.Join(p50s, " and "))
	}
	b.WriteString("\n\ncreate → RUNNING is per VM: CreateVM sent → the VM's phase RUNNING seen by one `ListVMs` every 250 ms (±250 ms) through the API replicas; RUNNING means the host's agent has the domain started (libvirt returned once QEMU runs the guest), not that the guest has booted. Before the batches, one VM per host (created, RUNNING, deleted) puts the image in every host's cache, so neither batch pays for a download; the batches then run one after the other, each deleted and waited for before the next, in rounds that alternate the order (spread first, then one host first) so a load drifting during the run weighs on both kinds alike; two rows of one kind show how much the shared machine alone moves the numbers. With 30 samples p99 is the slowest VM. GuestReady is not measured: 30 TCG boots at once take minutes on this machine and measure QEMU's emulation (agentbench and bootbench measure boots). All hosts share the machine's 2 cores, so spreading over hosts adds no CPU: what it changes is the per-host work (one agent and one libvirtd each handling a third of the VMs, against one handling all).\n\n")
	b.WriteString("| guests | MTU | ICMP echo RTT min | p50 | max | TCP throughput (one stream) | bytes out of host1's VXLAN device meanwhile |\n|---|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range nets {
		fmt.Fprintf(&b, "| %s | %d | %s | %s | %s | %.0f Mbit/s | %.1f MB |\n", r.what, r.mtu, us(r.rtt[0]), us(pct(r.rtt, 0.5)), us(r.rtt[len(r.rtt)-1]), r.mbits, float64(r.vxlanBytes)/1e6)
	}
	fmt.Fprintf(&b, "\nHow the network rows are measured. The tiny guest runs no user commands, and a TCG guest's emulated virtio NIC would measure QEMU rather than the network, so the guests are network namespaces that take over real VMs' ports: VMs net-a1, net-a2 (host1) and net-b1 (host2) are created through the API on the lab's default network, reach RUNNING, and their domains are powered off from inside their hosts (`virsh destroy`; the agent reports STOPPED and keeps the port). Each VM's address, MAC, port record, the other hosts' VXLAN forwarding, neighbour and tunnel-allowlist entries are therefore the real ones. A namespace per VM gets a veth whose guest end carries the VM's MAC, address and the network's MTU (%s; VXLAN networks advertise the underlay MTU minus 50); the host end joins the VM's bridge in the VM's host, adopted by the agent's own network manager (`agent/network/linux`, `PortSpec.Existing`) with the same anti-spoofing filter a tap gets. Ping: %d ICMP echoes (56-byte payload, DF set) 200 ms apart, each awaiting its reply, after a 2-echo warm-up (ARP, FDB), sent by a Go program in the namespace (the machine has no ping(8)); then one full-MTU echo with DF set, which must pass. TCP: one connection, %s of 128 KiB writes from the first guest to a sink in the second (a Go program on both ends, no iperf3 on the machine), bytes counted once the sink has read them all; the harness checks the path by host1's VXLAN transmit counters (the cross-host stream must leave through VXLAN, the same-host one must not touch it) and fails otherwise. Both ends share the 2 loaded cores with everything else, so throughput is bounded by CPU, not by a link; the difference between the rows is the cost of the VXLAN encapsulation, the underlay veths and bridge, and the tunnel's nftables rules.\n",
		mtus(nets), o.pings, o.tcpTime)
	return b.String()
}

func mtus(nets []netResult) string {
	var s []string
	for _, r := range nets {
		s = append(s, strconv.Itoa(r.mtu))
	}
	return strings.Join(s, ", ")
}
