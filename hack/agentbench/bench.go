package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/nic"
)

// Event reasons that mark the steps of a create, in order, and who writes
// them.
var steps = []string{
	"Created",      // API: the VM is stored
	"Scheduled",    // scheduler: host chosen, address allocated
	"Creating",     // agent: picked the VM up (with RUNNING when the create was fast)
	"DiskReady",    // agent: image cached, overlay made
	"NetworkReady", // agent: bridge, tap, anti-spoofing rules, guest services
	"Started",      // agent: domain defined and started
}

// roundTimeout bounds one round's wait for RUNNING or for deletion.
const roundTimeout = 3 * time.Minute

// sample is one VM's create, timed from the client's request.
type sample struct {
	name, id   string
	sent       time.Time            // client: CreateVM sent
	running    time.Time            // client: the watch delivered phase RUNNING
	at         map[string]time.Time // first event of each reason in steps
	hypervisor string
}

// round is one batch of creates through minicloud and, when measured, the
// same number of raw libvirt creates.
type round struct {
	samples []sample
	raw     []time.Duration
}

type bench struct {
	cloud     *cloud
	opts      options
	watch     *watcher
	stopWatch context.CancelFunc // ends watch (before a restart breaks it)

	cold       round   // first create: the image is not cached yet
	single     []round // one VM at a time, the network's first on the host
	warm       []round // one VM at a time, beside a VM kept on its network
	concurrent round

	template   *rawTemplate
	overlays   int   // VM disks checked to be overlays
	overlayMax int64 // largest allocated size of a VM overlay
	imageSize  int64 // allocated size of the cached image
	backing    string
	bridge     string
	loadBefore string
	loadAfter  string
	started    time.Time
	elapsed    time.Duration
	cleanedUp  bool
	repeated   int // disturbed rounds repeated
}

// setup creates the network, flavor and image every VM uses, and starts
// the watch that times RUNNING.
func (b *bench) setup(ctx context.Context, img string) error {
	cmdline, err := os.ReadFile(filepath.Join(img, "cmdline"))
	if err != nil {
		return err
	}
	// A CIDR of its own, so that tests and a `make up` cloud on the same
	// machine never share its bridge.
	cidr := fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(50), rand.IntN(250))
	for _, args := range [][]string{
		{"network", "create", "default", "--cidr", cidr},
		{"flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1"},
		{"image", "create", "tiny", "--file", filepath.Join(img, "disk.qcow2"),
			"--kernel", filepath.Join(img, "vmlinuz"), "--initrd", filepath.Join(img, "initrd.img"),
			"--cmdline", strings.TrimSpace(string(cmdline))},
	} {
		if err := b.cloud.mc(ctx, args...); err != nil {
			return err
		}
	}
	b.startWatch(ctx)
	return nil
}

// startWatch starts a watcher on the cloud's current client.
func (b *bench) startWatch(ctx context.Context) {
	ctx, b.stopWatch = context.WithCancel(ctx)
	b.watch = newWatcher()
	go b.watch.run(ctx, b.cloud.client.VMs)
}

// measure runs the rounds: a cold create, reps single creates, one
// concurrent batch; each minicloud batch is deleted (and checked) before
// its raw counterpart runs, so no guest boots on the CPUs meanwhile.
func (b *bench) measure(ctx context.Context) error {
	rawDir, err := os.MkdirTemp("/var/tmp", "agentbench-raw-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(rawDir)
	if err := os.Chmod(rawDir, 0o711); err != nil {
		return err
	}
	b.loadBefore, b.started = loadAverage(), time.Now()

	logf("cold create (image not cached yet)")
	// Not repeated when disturbed: a second try would find the image cached.
	if b.cold, err = b.createRound(ctx, "cold", 1); err != nil {
		return err
	}
	for i := 0; i < b.opts.reps; i++ {
		logf("single create %d/%d: minicloud, then raw libvirt createXML", i+1, b.opts.reps)
		r, err := b.singleRound(ctx, rawDir, fmt.Sprintf("one%d", i))
		if err != nil {
			return err
		}
		b.single = append(b.single, r)
	}
	if b.warm, err = b.warmRounds(ctx, rawDir); err != nil {
		return err
	}
	logf("%d concurrent creates: minicloud, then raw libvirt createXML", b.opts.concurrency)
	if b.concurrent, err = b.minicloudRound(ctx, "many", b.opts.concurrency); err != nil {
		return err
	}
	if b.concurrent.raw, err = runRawRepeated(ctx, b.template, rawDir, b.opts.concurrency, &b.repeated); err != nil {
		return err
	}
	b.loadAfter, b.elapsed = loadAverage(), time.Since(b.started)
	return nil
}

// singleRound is one VM through minicloud, deleted, then one raw createXML.
func (b *bench) singleRound(ctx context.Context, rawDir, label string) (round, error) {
	r, err := b.minicloudRound(ctx, label, 1)
	if err != nil {
		return r, err
	}
	r.raw, err = runRawRepeated(ctx, b.template, rawDir, 1, &b.repeated)
	return r, err
}

// keptVM is the VM the warm rounds keep on the network.
const keptVM = "bench-kept"

// warmRounds runs reps single creates beside one VM kept RUNNING on the same
// network, so each finds the network's bridge already on the host — the
// usual case in a cloud — where the single rounds above each pay for a new
// bridge (their round's delete removed it with the network's last VM). The
// raw batches run beside the kept VM too, so both sides share a host with
// one idle guest. The kept VM is deleted and checked at the end, and the
// bridge must go with it, so the concurrent round starts from no bridge as
// before.
func (b *bench) warmRounds(ctx context.Context, rawDir string) (_ []round, err error) {
	logf("kept VM: one VM stays on the network through %d single creates", b.opts.reps)
	kept, err := b.createVMs(ctx, []string{keptVM}, "tiny")
	if err == nil {
		err = b.watch.wait(ctx, []string{keptVM}, "RUNNING", func(st *vmState) bool { return !st.running.IsZero() })
	}
	if err == nil {
		err = b.checkOverlay(ctx, kept[0].id)
	}
	defer func() {
		// Deleted (and checked) even when a round failed.
		if derr := b.deleteVMs(ctx, []string{keptVM}); derr != nil {
			err = errors.Join(err, fmt.Errorf("kept VM: %w", derr))
		} else if b.bridge != "" {
			if gerr := waitLinkGone(ctx, b.bridge, 10*time.Second); gerr != nil {
				err = errors.Join(err, fmt.Errorf("the network's bridge after its last VM, the kept one, was deleted: %w", gerr))
			}
		}
	}()
	if err != nil {
		return nil, err
	}
	var rounds []round
	for i := 0; i < b.opts.reps; i++ {
		// The row claims the bridge is there: check it, not assume it.
		if _, err := netlink.LinkByName(b.bridge); err != nil {
			return rounds, fmt.Errorf("bridge %s with VM %s on its network: %w", b.bridge, keptVM, err)
		}
		logf("single create %d/%d beside the kept VM: minicloud, then raw libvirt createXML", i+1, b.opts.reps)
		r, err := b.singleRound(ctx, rawDir, fmt.Sprintf("warm%d", i))
		if err != nil {
			return rounds, err
		}
		rounds = append(rounds, r)
	}
	return rounds, nil
}

// disturbedError marks a round whose timeline is incomplete because a step
// failed and the agent's retry finished it (on this shared machine: another
// engineer's test restarting libvirtd mid-create). The round is repeated.
type disturbedError struct{ err error }

func (e *disturbedError) Error() string { return e.err.Error() }
func (e *disturbedError) Unwrap() error { return e.err }

// maxRepeats bounds how often a disturbed round is repeated.
const maxRepeats = 2

// minicloudRound runs createRound, repeating a disturbed one.
func (b *bench) minicloudRound(ctx context.Context, label string, n int) (round, error) {
	for attempt := 0; ; attempt++ {
		r, err := b.createRound(ctx, fmt.Sprintf("%s%c", label, 'a'+attempt), n)
		var d *disturbedError
		if !errors.As(err, &d) || attempt == maxRepeats {
			return r, err
		}
		b.repeated++
		logf("round disturbed, repeating it: %v", err)
	}
}

// createRound creates n VMs at once through the API, waits until each
// is RUNNING, reads their event logs, checks their disks, and deletes them.
func (b *bench) createRound(ctx context.Context, label string, n int) (round, error) {
	var r round
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("bench-%s-%d", label, i)
	}
	var err error
	if r.samples, err = b.createVMs(ctx, names, "tiny"); err != nil {
		return r, err
	}
	waitErr := b.watch.wait(ctx, names, "RUNNING", func(st *vmState) bool { return !st.running.IsZero() })
	if waitErr == nil {
		waitErr = b.collect(ctx, r.samples)
	}
	// Delete even when the round failed, so nothing outlives the run.
	if err := b.deleteVMs(ctx, names); err != nil {
		return r, errors.Join(waitErr, err)
	}
	return r, waitErr
}

// createVMs sends one CreateVM per name at once (image tiny, the flavor
// given) and returns the samples with their send times and VM ids.
func (b *bench) createVMs(ctx context.Context, names []string, flavor string) ([]sample, error) {
	samples := make([]sample, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := &samples[i]
			s.name, s.sent = names[i], time.Now()
			vm, err := b.cloud.client.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{
				Name:      names[i],
				Spec:      &minicloudv1.VMSpec{Image: "tiny", Flavor: flavor},
				RequestId: uuid.NewString(),
			})
			if err != nil {
				errs[i] = fmt.Errorf("create VM %s: %w", names[i], err)
				return
			}
			s.id = vm.GetMeta().GetId()
		}()
	}
	wg.Wait()
	return samples, errors.Join(errs...)
}

// collect fills in each sample's timestamps and checks its disk.
func (b *bench) collect(ctx context.Context, samples []sample) error {
	for i := range samples {
		s := &samples[i]
		st := b.watch.state(s.name)
		s.running, s.hypervisor = st.running, st.vm.GetStatus().GetHypervisor()
		if b.bridge == "" && len(st.vm.GetStatus().GetAddresses()) > 0 {
			b.bridge = st.vm.GetStatus().GetAddresses()[0].GetBridge()
		}
		resp, err := b.cloud.client.VMs.ListVMEvents(ctx, &minicloudv1.ListVMEventsRequest{Name: s.name})
		if err != nil {
			return fmt.Errorf("events of %s: %w", s.name, err)
		}
		s.at = map[string]time.Time{}
		for _, ev := range resp.GetEvents() {
			if t, seen := s.at[ev.GetReason()]; !seen || ev.GetTime().AsTime().Before(t) {
				s.at[ev.GetReason()] = ev.GetTime().AsTime()
			}
		}
		// The agent reports DiskReady, NetworkReady and Started in one
		// report, and the API stamps every event of a report with its own
		// clock (pkg/store events.go: a reporter cannot backdate), so those
		// steps are timed by the conditions the agent stamped as each step
		// ended (the same host clock).
		for cond, step := range map[string]string{
			lifecycle.ConditionDiskReady:     "DiskReady",
			lifecycle.ConditionNetworkReady:  "NetworkReady",
			lifecycle.ConditionDomainRunning: "Started",
		} {
			for _, c := range st.vm.GetStatus().GetConditions() {
				if c.GetType() == cond && c.GetStatus() && c.GetLastTransitionTime() != nil {
					s.at[step] = c.GetLastTransitionTime().AsTime()
				}
			}
		}
		for _, step := range steps {
			if _, ok := s.at[step]; !ok {
				return &disturbedError{fmt.Errorf("VM %s reached RUNNING without a %s event (a step failed and was retried; see the minicloudd log); events: %v", s.name, step, resp.GetEvents())}
			}
		}
		if err := b.checkOverlay(ctx, s.id); err != nil {
			return err
		}
	}
	return nil
}

// checkOverlay verifies that the VM's disk is a qcow2 overlay backed by the
// agent's cached image, not a copy of it; the first VM's domain becomes the
// template of the raw baseline.
func (b *bench) checkOverlay(ctx context.Context, id string) error {
	path := filepath.Join(b.cloud.dataDir, "agent", "vms", id, "disk.qcow2")
	di, err := qemuImgInfo(ctx, path, "qcow2")
	if err != nil {
		return err
	}
	backing := di.FullBackingFilename
	if backing == "" {
		backing = di.BackingFilename
	}
	cache := filepath.Join(b.cloud.dataDir, "agent", "images") + string(filepath.Separator)
	if di.Format != "qcow2" || !strings.HasPrefix(backing, cache) {
		return fmt.Errorf("disk of VM %s is not an overlay of the image cache: format %s, backing file %q", id, di.Format, backing)
	}
	if b.template == nil {
		if b.template, err = captureTemplate(ctx, id, path); err != nil {
			return err
		}
		bi, err := qemuImgInfo(ctx, backing, di.BackingFormat)
		if err != nil {
			return err
		}
		b.imageSize, b.backing = bi.ActualSize, backing
	}
	b.overlays++
	b.overlayMax = max(b.overlayMax, di.ActualSize)
	return nil
}

// deleteVMs deletes VMs through the API, waits until they are gone, and
// checks libvirt, the links and the agent's directory for anything left.
func (b *bench) deleteVMs(ctx context.Context, names []string) error {
	var errs []error
	for _, name := range names {
		_, err := b.cloud.client.VMs.DeleteVM(ctx, &minicloudv1.DeleteVMRequest{Name: name})
		if err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete VM %s: %w", name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := b.watch.wait(ctx, names, "deleted", func(st *vmState) bool { return st.deleted }); err != nil {
		return err
	}
	for _, name := range names {
		if id := b.watch.state(name).id; id != "" {
			errs = append(errs, b.checkNothingLeft(ctx, id))
		}
	}
	return errors.Join(errs...)
}

// checkNothingLeft asks libvirt, the kernel and the file system (not
// minicloud) whether anything of VM id survived its deletion.
func (b *bench) checkNothingLeft(ctx context.Context, id string) error {
	var errs []error
	if exists, err := domainExists(ctx, "mc-"+id); err != nil || exists {
		errs = append(errs, fmt.Errorf("domain mc-%s still exists (%v)", id, err))
	}
	tap := nic.TapNamePrefix(id)
	out, err := exec.CommandContext(ctx, "ip", "-o", "link", "show").Output()
	if err != nil {
		return fmt.Errorf("ip link: %w", err)
	}
	if strings.Contains(string(out), tap) {
		errs = append(errs, fmt.Errorf("tap %s* of VM %s still exists", tap, id))
	}
	if _, err := os.Stat(filepath.Join(b.cloud.dataDir, "agent", "vms", id)); !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("directory of VM %s still exists (%v)", id, err))
	}
	return errors.Join(errs...)
}

// waitLinkGone waits until the kernel has no link of that name: the agent
// removes a network's bridge after reporting its last VM deleted, so it
// may go a moment after the watch said DELETED.
func waitLinkGone(ctx context.Context, name string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	// Subscribed before the first look, so a removal in between is seen.
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{}); err != nil {
		return fmt.Errorf("subscribe to links: %w", err)
	}
	if _, err := netlink.LinkByName(name); err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("look up %s: %w", name, err)
	}
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s still exists: %w", name, ctx.Err())
		case u, ok := <-updates:
			if !ok {
				return fmt.Errorf("link subscription ended while waiting for %s to go", name)
			}
			if u.Header.Type == unix.RTM_DELLINK && u.Link.Attrs().Name == name {
				return nil
			}
		}
	}
}

// cleanup deletes every VM the cloud still has (after a failed round) and
// checks that the network's bridge went with the last one. It can run
// twice.
func (b *bench) cleanup(ctx context.Context) error {
	if b.cleanedUp {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, roundTimeout)
	defer cancel()
	if b.watch == nil {
		return nil
	}
	if b.cloud.client == nil {
		return errors.New("clean-up: the all-in-one is not running (a restart failed); its VMs are purged with its data directory")
	}
	list, err := b.cloud.client.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{})
	if err != nil {
		return fmt.Errorf("list VMs for clean-up: %w", err)
	}
	var names []string
	for _, vm := range list.GetVms() {
		names = append(names, vm.GetMeta().GetName())
	}
	if len(names) > 0 {
		logf("deleting %d VMs left by a failed round", len(names))
		if err := b.deleteVMs(ctx, names); err != nil {
			return err
		}
	}
	if b.bridge != "" {
		if err := waitLinkGone(ctx, b.bridge, 10*time.Second); err != nil {
			return fmt.Errorf("the network's bridge after the last VM was deleted: %w", err)
		}
	}
	b.cleanedUp = true
	return nil
}
