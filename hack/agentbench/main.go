// Command agentbench measures VM create → RUNNING through the whole control
// plane — API, scheduler, agent (image cache, disk overlay, tap, define,
// start) — on a real all-in-one with real libvirt/QEMU and the tiny image,
// side by side in the same run with a raw libvirt createXML of the same
// domain XML, for 1 and for N concurrent creates (single creates both as the
// network's first VM on the host and beside a VM kept on the network, whose
// bridge then exists). The breakdown comes from the VM's event log and
// conditions. It checks that every VM disk is a qcow2
// overlay of the cached image (never a copy), deletes everything it made,
// checks that nothing is left, and rewrites the "agent" section of
// docs/benchmarks.md.
//
//	go run ./hack/agentbench [-reps 3] [-concurrency 10] [-docs docs/benchmarks.md]
//
// With -density 10,50 it measures density instead (issue 15, section 4;
// density.go): per VM count, that many tiny VMs booted at once until
// GuestReady, the agent at rest with them, and a kill and restart of the
// all-in-one until every VM is reconciled again, nothing recreated.
//
// Needs root (libvirt, bridges, taps, nftables) and a running libvirtd
// (hack/setup-host.sh). Takes about two minutes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/minicloud/minicloud/hack/benchdoc"
)

func main() {
	var o options
	flag.IntVar(&o.reps, "reps", 3, "single-create rounds, once as the network's first VM on the host and once beside a VM kept on it (each: one VM through minicloud, then one raw libvirt createXML)")
	flag.IntVar(&o.concurrency, "concurrency", 10, "VMs created at once in the concurrent round")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Minute, "bound on the whole run, clean-up included")
	flag.StringVar(&o.docs, "docs", "docs/benchmarks.md", "benchmark page to update (empty: print only)")
	flag.IntVar(&o.metadataUpdates, "metadata-updates", 0, "instead of the create rounds: time N live metadata updates until a guest's wait_for_change sees each (section metadata-updates)")
	density := flag.String("density", "", "instead of the create rounds: for each VM count (e.g. 10,50), boot that many 128 MiB VMs at once until GuestReady, measure the agent at rest, kill and restart the all-in-one and time its resync (section density-vms)")
	flag.DurationVar(&o.readyTimeout, "ready-timeout", 15*time.Minute, "density mode: bound on the wait for every VM of one count to be GuestReady")
	flag.Parse()
	if *density != "" {
		var err error
		if o.density, err = benchdoc.Counts(*density); err != nil || len(o.density) == 0 {
			log.Fatalf("agentbench: -density %q: want VM counts such as 10,50 (%v)", *density, err)
		}
		timeoutSet := false
		flag.Visit(func(f *flag.Flag) { timeoutSet = timeoutSet || f.Name == "timeout" })
		if !timeoutSet {
			// Each count: the boots, a minute at rest, the restart, the
			// deletes.
			o.timeout = time.Duration(len(o.density)) * (o.readyTimeout + 10*time.Minute)
		}
	}
	if o.reps < 1 || o.concurrency < 1 {
		log.Fatal("agentbench: -reps and -concurrency must be at least 1")
	}
	if err := checkHost(); err != nil {
		log.Fatalf("agentbench: %v", err)
	}
	if err := run(o); err != nil {
		log.Fatalf("agentbench: %v", err)
	}
}

type options struct {
	reps, concurrency int
	metadataUpdates   int
	density           []int         // VM counts of the density mode
	readyTimeout      time.Duration // density mode: bound on one count's boots
	timeout           time.Duration
	docs              string
}

func checkHost() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (libvirt, bridges, taps, nftables): run it with sudo")
	}
	if _, err := os.Stat("/var/run/libvirt/libvirt-sock"); err != nil {
		return errors.New("libvirtd is not running (hack/setup-host.sh installs and starts it)")
	}
	for _, tool := range []string{"virsh", "qemu-img", "ip", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found in PATH", tool)
		}
	}
	return nil
}

func loadAverage() string { return benchdoc.LoadAverages() }

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "agentbench: "+format+"\n", args...)
}

func run(o options) (err error) {
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	root := repoRoot()

	logf("building the tiny image (cached) and the binaries")
	img := filepath.Join(root, "images/out/tiny")
	build := exec.CommandContext(ctx, filepath.Join(root, "hack/images/build-tiny.sh"))
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build tiny image: %w\n%s", err, out)
	}
	binDir, err := os.MkdirTemp("", "agentbench-bin-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(binDir)
	cli, daemon, err := buildBinaries(ctx, binDir)
	if err != nil {
		return err
	}

	logf("starting minicloudd all-in-one")
	c, err := startCloud(ctx, cli, daemon)
	if err != nil {
		return err
	}
	b := &bench{cloud: c, opts: o}
	defer func() {
		// Clean-up runs even when the run timed out or failed.
		cerr := b.cleanup(context.Background())
		if serr := c.stop(); serr != nil {
			cerr = errors.Join(cerr, serr)
		}
		err = errors.Join(err, cerr)
		c.remove(err != nil)
		if err != nil {
			logf("minicloudd log kept at %s", c.logPath)
		}
	}()
	if err := b.setup(ctx, img); err != nil {
		return err
	}
	if len(o.density) > 0 {
		rows, err := b.measureDensity(ctx, o.density, o.readyTimeout)
		if err != nil {
			return err
		}
		if err := b.cleanup(ctx); err != nil {
			return err
		}
		return writeSection(o.docs, "density-vms", renderDensity(b, rows, o.readyTimeout))
	}
	if o.metadataUpdates > 0 {
		m, err := b.measureMetadataUpdates(ctx, o.metadataUpdates)
		if err != nil {
			return err
		}
		if err := b.cleanup(ctx); err != nil {
			return err
		}
		return writeSection(o.docs, "metadata-updates", m.render())
	}
	if err := b.measure(ctx); err != nil {
		return err
	}
	// Delete and check now, so the page only claims a clean run.
	if err := b.cleanup(ctx); err != nil {
		return err
	}
	return writeSection(o.docs, "agent", b.render())
}

// writeSection prints a table and, with a docs page, rewrites its section.
func writeSection(docs, name, table string) error {
	fmt.Println(table)
	if docs == "" {
		return nil
	}
	if err := benchdoc.RewriteSection(docs, name, table); err != nil {
		return err
	}
	logf("rewrote the %s section of %s", name, docs)
	return nil
}
