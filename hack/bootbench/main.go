// Command bootbench boots the Debian cloud image (real cloud-init 22.4)
// through a minicloud all-in-one and measures, from the domain's start (the
// VM's "Started" event), when the guest first connects to
// 169.254.169.254:80 (the first SYN, seen by tcpdump on the host) and when
// cloud-init is done (its final message on the serial console). It then
// boots the same image again with the guest's metadata connections
// diverted to a static server holding the same answers pre-rendered, and
// writes both into the bootbench section of docs/benchmarks.md.
//
//	sudo go run ./hack/bootbench [-runs 1] [-docs docs/benchmarks.md]
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/hack/benchdoc"
)

func main() {
	runs := flag.Int("runs", 1, "boots per metadata server")
	docs := flag.String("docs", "", "rewrite the bootbench section of this file (e.g. docs/benchmarks.md)")
	image := flag.String("image", "", "prebuilt Debian image directory (default: build it with hack/images/build-debian.sh)")
	deadline := flag.Duration("boot-deadline", 30*time.Minute, "how long one boot may take (TCG on a loaded 2-core host: up to ~20 min)")
	flag.Parse()
	log.SetFlags(log.Ltime)
	if os.Geteuid() != 0 {
		log.Fatal("bootbench needs root (libvirt, bridges, nftables, tcpdump)")
	}
	// Interrupted, the harness still deletes its VM and stops its cloud.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *runs, *docs, *image, *deadline); err != nil {
		log.Fatal(err)
	}
}

// boot is what one boot measured; durations count from the domain start.
type boot struct {
	server       string // "minicloud" or "static"
	datasource   string
	initLocal    time.Duration // cloud-init's first stage shows on the console
	firstRequest time.Duration // first SYN to 169.254.169.254:80
	done         time.Duration // cloud-init's final message
	guestUp      string        // the guest's own uptime in that message
	requests     int           // static server only
	missing      []string      // static server only: paths it could not answer
}

var (
	initLocalLine = regexp.MustCompile(`Cloud-init v\. \S+ running 'init-local'`)
	finishedLine  = regexp.MustCompile(`Cloud-init v\. \S+ finished at [^\n]*Datasource (\S+)[^\n]*Up ([0-9.]+) seconds`)
)

func repoRoot() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return "", fmt.Errorf("go list -m: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

func run(ctx context.Context, runs int, docs, image string, deadline time.Duration) error {
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	if image == "" {
		cmd := exec.Command(filepath.Join(repo, "hack/images/build-debian.sh"))
		cmd.Dir, cmd.Stdout, cmd.Stderr = repo, os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build the Debian image: %w", err)
		}
		image = filepath.Join(repo, "images/out/debian")
	}
	cmdline, err := os.ReadFile(filepath.Join(image, "cmdline"))
	if err != nil {
		return err
	}
	log.Print("starting an all-in-one")
	c, err := startCloud(ctx, repo)
	if err != nil {
		return err
	}
	defer c.stop()
	cidr := fmt.Sprintf("10.%d.%d.0/24", 150+time.Now().Nanosecond()%40, time.Now().Nanosecond()/1000%250)
	for _, args := range [][]string{
		{"network", "create", "default", "--cidr", cidr},
		{"flavor", "create", "bench", "--vcpus", "1", "--memory-mib", "1024", "--disk-gib", "4"},
		{"image", "create", "debian", "--file", filepath.Join(image, "disk.qcow2"),
			"--kernel", filepath.Join(image, "vmlinuz"), "--initrd", filepath.Join(image, "initrd.img"),
			"--cmdline", strings.TrimSpace(string(cmdline))},
	} {
		if _, err := c.mc(args...); err != nil {
			return err
		}
	}
	var boots []boot
	servers := []string{"minicloud", "static"}
	for i := 0; i < runs; i++ {
		// Both guests boot at the same time: on a shared machine whose
		// load swings by a factor of three within minutes, that is what
		// makes the two columns comparable.
		results := make([]boot, len(servers))
		errs := make([]error, len(servers))
		var wg sync.WaitGroup
		for j, server := range servers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[j], errs[j] = bootOnce(ctx, c, fmt.Sprintf("boot-%s-%d", server, i), server, deadline)
			}()
		}
		wg.Wait()
		for j, server := range servers {
			if errs[j] != nil {
				return fmt.Errorf("%s boot %d: %w", server, i, errs[j])
			}
			log.Printf("%s: %+v", server, results[j])
		}
		boots = append(boots, results...)
	}
	table := render(boots)
	fmt.Print(table)
	if docs != "" {
		return benchdoc.RewriteSection(docs, "bootbench", table)
	}
	return nil
}

// bootOnce creates one VM, measures its boot, and deletes it.
func bootOnce(ctx context.Context, c *cloud, name, server string, deadline time.Duration) (boot, error) {
	b := boot{server: server}
	userData := []byte("#cloud-config\nhostname: " + name + "\nruncmd:\n  - [ sh, -c, 'echo BOOTBENCH-RUNCMD > /dev/console' ]\n")
	udFile := filepath.Join(c.dataDir, name+".user-data")
	if err := os.WriteFile(udFile, userData, 0o644); err != nil {
		return b, err
	}
	if _, err := c.mc("vm", "create", name, "--image", "debian", "--flavor", "bench", "--user-data", "@"+udFile); err != nil {
		return b, err
	}
	defer func() {
		if _, err := c.mc("vm", "delete", name, "--wait", "--timeout", "3m"); err != nil {
			log.Printf("delete %s: %v", name, err)
		}
	}()
	vm, err := c.client.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: name})
	if err != nil {
		return b, err
	}
	if len(vm.GetStatus().GetAddresses()) == 0 {
		return b, fmt.Errorf("VM %s has no address", name)
	}
	ip, err := netip.ParseAddr(vm.GetStatus().GetAddresses()[0].GetIp())
	if err != nil {
		return b, err
	}

	// The address is allocated by the API: everything below is in place
	// before the agent has even fetched the image.
	syn, stopCapture, err := firstSYN(ip)
	if err != nil {
		return b, err
	}
	defer stopCapture()
	var static *staticServer
	if server == "static" {
		files, err := snapshot(vm, userData)
		if err != nil {
			return b, fmt.Errorf("render the static tree: %w", err)
		}
		if static, err = startStatic(files); err != nil {
			return b, err
		}
		defer static.close()
		undo, err := divert(ip, static.addr)
		if err != nil {
			return b, err
		}
		defer undo()
	}

	if _, err := c.mc("vm", "wait", name, "--for", "running", "--timeout", "10m"); err != nil {
		return b, err
	}
	started, err := startedAt(ctx, c, name)
	if err != nil {
		return b, err
	}
	end := time.Now().Add(deadline)
	var seenInit time.Time
	for {
		resp, err := c.client.VMs.GetConsoleLog(ctx, &minicloudv1.GetConsoleLogRequest{Name: name, TailBytes: 1 << 20})
		if err != nil {
			return b, err
		}
		now, console := time.Now(), string(resp.GetData())
		if seenInit.IsZero() && initLocalLine.MatchString(console) {
			seenInit = now
		}
		if m := finishedLine.FindStringSubmatch(console); m != nil {
			b.done, b.datasource, b.guestUp = now.Sub(started), m[1], m[2]
			break
		}
		if now.After(end) {
			return b, fmt.Errorf("cloud-init did not finish within %v; console:\n%s", deadline, console)
		}
		// The console has no event stream; 250 ms is the resolution of
		// the console columns.
		select {
		case <-ctx.Done():
			return b, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	if !seenInit.IsZero() {
		b.initLocal = seenInit.Sub(started)
	}
	select {
	case t := <-syn:
		b.firstRequest = t.Sub(started)
	case <-time.After(5 * time.Second):
		// A config-drive or metadata-less boot: no column.
	}
	if static != nil {
		_, b.requests, b.missing = static.stats()
	}
	return b, nil
}

// startedAt is the time of the VM's "Started" event (the agent's report
// right after libvirt started the domain).
func startedAt(ctx context.Context, c *cloud, name string) (time.Time, error) {
	resp, err := c.client.VMs.ListVMEvents(ctx, &minicloudv1.ListVMEventsRequest{Name: name})
	if err != nil {
		return time.Time{}, err
	}
	for _, ev := range resp.GetEvents() {
		if ev.GetReason() == "Started" {
			return ev.GetTime().AsTime(), nil
		}
	}
	return time.Time{}, fmt.Errorf("VM %s is running but has no Started event", name)
}

// firstSYN reports when the guest first opens a connection to
// 169.254.169.254:80, seen by tcpdump on the host (the same observer for
// both servers). It watches every interface: the bridge may not exist yet.
func firstSYN(guest netip.Addr) (<-chan time.Time, func(), error) {
	filter := fmt.Sprintf("src host %s and dst host 169.254.169.254 and tcp dst port 80 and tcp[tcpflags] & tcp-syn != 0", guest)
	cmd := exec.Command("tcpdump", "-i", "any", "-n", "-l", "-tt", "-c", "1", filter)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("tcpdump: %w", err)
	}
	// tcpdump says "listening on any" once it captures.
	listening := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			if !once && strings.Contains(sc.Text(), "listening on") {
				once = true
				close(listening)
			}
		}
		if !once {
			close(listening)
		}
	}()
	select {
	case <-listening:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		return nil, nil, fmt.Errorf("tcpdump did not start capturing")
	}
	out := make(chan time.Time, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			if f := strings.Fields(sc.Text()); len(f) > 0 {
				if sec, err := strconv.ParseFloat(f[0], 64); err == nil {
					out <- time.Unix(0, int64(sec*1e9))
				}
			}
		}
	}()
	stop := func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	return out, stop, nil
}

func secs(d time.Duration) string {
	if d == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f", d.Seconds())
}

func render(boots []boot) string {
	var sb strings.Builder
	host, _ := os.Hostname()
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&sb, "`sudo go run ./hack/bootbench` on %s, %s, load %s (TCG, 1 vCPU, 1024 MiB; Debian 12, cloud-init 22.4).\n",
		host, time.Now().UTC().Format("2006-01-02 15:04 UTC"), strings.Join(strings.Fields(string(load))[:3], " "))
	sb.WriteString("Both guests of a round boot at the same time. Seconds from each domain's start (its VM's Started event).\n\n")
	sb.WriteString("| metadata served by | datasource | cloud-init init-local on console | first metadata SYN | cloud-init done | guest uptime at done | static: requests / unanswered |\n")
	sb.WriteString("|---|---|---|---|---|---|---|\n")
	for _, b := range boots {
		served := "minicloud metadata service"
		extra := "–"
		if b.server == "static" {
			served = "static server (pre-rendered, DNAT)"
			extra = fmt.Sprintf("%d / %d", b.requests, len(b.missing))
		}
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s | %s | %s |\n",
			served, b.datasource, secs(b.initLocal), secs(b.firstRequest), secs(b.done), b.guestUp, extra)
	}
	for _, b := range boots {
		if len(b.missing) > 0 {
			fmt.Fprintf(&sb, "\nThe static server could not answer: %s\n", strings.Join(b.missing, ", "))
		}
	}
	return sb.String()
}
