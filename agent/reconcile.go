package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/network"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/nic"
)

// This file is the VM lifecycle on a host. reconcile(id) reads the desired
// state (the assignment from the API), observes the host (libvirt, files,
// links), converges, and reports. Every step measures before it acts, so a
// second run changes nothing and a run interrupted anywhere (kill -9) is
// finished by the next one.

// result tells the worker when to look at a VM again without an event.
type result struct {
	RequeueAfter time.Duration
}

// permanentError marks a failure that retrying on this host will not fix
// (a corrupt image, a flavor too small for the image): the VM goes to ERROR
// with reason and message the user reads in `minicloud vm show`.
type permanentError struct {
	reason string
	err    error
}

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// Permanent marks err as a failure that retrying on this host will not fix;
// reason is the VM's status reason (CamelCase, e.g. "ImageNotFound").
func Permanent(reason string, err error) error { return &permanentError{reason: reason, err: err} }

// createAttemptsBeforeReschedule is how many times a failing create is
// retried on this host before the host gives the VM back to the scheduler.
const createAttemptsBeforeReschedule = 3

func (a *Agent) reconcile(ctx context.Context, id string) (result, error) {
	a.mu.Lock()
	released := a.released[id]
	a.mu.Unlock()
	if released {
		// Before the fence test: a released VM is destroyed whatever else
		// holds (its copy elsewhere may already be running).
		return result{}, a.releaseVM(ctx, id)
	}
	if a.fenced() {
		// Nothing starts, stops or is reported until the fence lifts
		// (fenceLoop keeps every domain down meanwhile).
		return result{}, nil
	}
	a.mu.Lock()
	as, known := a.assigned[id]
	synced := a.synced
	var vm *minicloudv1.VM
	var userData []byte
	if known {
		vm, userData = as.vm, as.userData
	}
	a.mu.Unlock()

	if !known {
		if !synced {
			// Until the API has sent the full set, "unknown" may just mean
			// "not received yet": never destroy on a partial view.
			return result{}, nil
		}
		if _, err := os.Stat(a.vmDir(id)); errors.Is(err, os.ErrNotExist) {
			// Nothing of ours (see observedVMIDs): a domain event of some
			// other minicloud sharing this libvirt, or already cleaned up
			// — e.g. a VM given back to the scheduler, whose bridge its
			// assignment kept in use until now: the disk and network
			// steps run at once, so even a VM whose disk never worked
			// made one (TestDiskFailureLeavesNothingOnTheHost).
			return result{}, a.collectBridges(ctx)
		}
		// Not deleted by anyone: the API just no longer lists it. A wrong
		// --api, a restored etcd backup or a bug would make every VM look
		// so; the domain stops, but its files go to the trash, kept for
		// Config.TrashGrace, and nothing is lost for good.
		a.log.Warn("VM not assigned to this host: stopping it and keeping its files in the trash", "vm", id, "trash", a.trashDir(), "for", a.cfg.TrashGrace)
		if err := a.teardown(ctx, id, keepFiles); err != nil {
			return result{}, err
		}
		a.emptyTrash()
		return result{}, a.collectBridges(ctx)
	}
	if vm.GetSpec().GetDeletionRequested() {
		if err := a.teardown(ctx, id, removeFiles); err != nil {
			return result{}, err
		}
		a.publishGuests(ctx, id)
		if err := a.report(ctx, vm, nil, reportDeleted); err != nil {
			return result{}, err
		}
		return result{}, a.collectBridges(ctx)
	}
	if vm.GetStatus().GetPhase() == lifecycle.Error &&
		vm.GetStatus().GetObservedResourceVersion() == lifecycleVersion(vm) {
		// Already given up on this spec; a new spec write (start) retries.
		return result{}, nil
	}
	res, err := a.converge(ctx, vm, userData)
	var perm *permanentError
	switch {
	case errors.As(err, &perm):
		a.log.Warn("VM failed permanently on this host", "vm", id, "reason", perm.reason, "err", err)
		if terr := a.teardown(ctx, id, removeFiles); terr != nil {
			return result{}, terr
		}
		st := a.observedStatus(vm)
		st.Phase = lifecycle.Error
		st.Reason, st.Message = perm.reason, err.Error()
		// Given up on this very spec: the check above keeps later passes
		// (resyncs, events) from retrying it and warning again.
		st.ObservedResourceVersion = vm.GetMeta().GetResourceVersion()
		return result{}, a.report(ctx, vm, st, reportStatus, warning(perm.reason, err.Error()))
	case err != nil && a.queue.Failures(id)+1 >= createAttemptsBeforeReschedule && !a.domainEverCreated(vm):
		a.log.Warn("create keeps failing on this host; giving the VM back to the scheduler", "vm", id, "err", err)
		if terr := a.teardown(ctx, id, removeFiles); terr != nil {
			return result{}, terr
		}
		return result{}, a.report(ctx, vm, nil, reportReschedule, warning(lifecycle.ReasonCreateFailed, err.Error()))
	}
	return res, err
}

// lifecycleVersion is the spec version the host acts on for power and
// retries: a metadata update (labels, tags, metadata, SSH keys) writes the
// spec too, but must neither start a guest that shut itself down nor retry
// a VM in ERROR, so it carries the version of the last lifecycle write.
func lifecycleVersion(vm *minicloudv1.VM) int64 {
	if v := vm.GetSpec().GetLifecycleVersion(); v != 0 {
		return v
	}
	return vm.GetMeta().GetResourceVersion()
}

// metadataServed records in st that the metadata service now serves this
// spec version (publishGuests just ran) and returns the delivery event when
// that version is a metadata update the host had not served yet.
func (a *Agent) metadataServed(vm *minicloudv1.VM, st *minicloudv1.VMStatus) *minicloudv1.Event {
	rv := vm.GetMeta().GetResourceVersion()
	if st.ObservedMetadataVersion >= rv {
		return nil
	}
	first := st.ObservedMetadataVersion == 0
	st.ObservedMetadataVersion = rv
	if first || vm.GetSpec().GetLifecycleVersion() == 0 {
		return nil
	}
	return normal(lifecycle.ReasonMetadataDelivered, fmt.Sprintf("host %s serves the labels, tags, metadata and SSH keys of version %d", a.cfg.HostName, rv))
}

// domainEverCreated is true once the host reported the VM running or
// stopped: as the API stored it, or as this agent last reported it when the
// assignment stream has not delivered that report yet (a create's one
// report, SCHEDULED → RUNNING): a domain that vanishes in between is
// reported missing, not silently made again.
func (a *Agent) domainEverCreated(vm *minicloudv1.VM) bool {
	switch a.observedStatus(vm).GetPhase() {
	case lifecycle.Running, lifecycle.Stopped:
		return true
	}
	return false
}

func (a *Agent) converge(ctx context.Context, vm *minicloudv1.VM, userData []byte) (_ result, err error) {
	id := vm.GetMeta().GetId()
	st := a.observedStatus(vm)
	var events []*minicloudv1.Event

	// The image record is asked for while libvirt is asked about the
	// domain: both are round trips, and the define (below) waits for the
	// record. A pin (imagerecords.go) answers at once; a new VM's first
	// pass asks the API.
	image := a.lookupImage(ctx, vm)

	// A create's network and disk steps start beside libvirt's Status
	// too: with the network's bridge already on the host, the port and
	// the overlay are the longest steps before the define (1.5-8 ms in
	// hack/agentbench), and Status (0.4-1.4 ms) decides nothing they need
	// for a VM this host never created (observed SCHEDULED): for such a VM
	// Status can only turn up a copy of an earlier assignment epoch, whose
	// teardown below waits for the steps and takes their taps and files
	// with the copy's, and the steps then run again. Only the define waits
	// for Status (below). Every return waits for the steps: nothing of a
	// pass may outlive it.
	var (
		netStep  func() networkOutcome
		diskStep *diskStep
	)
	if st.Phase == lifecycle.Scheduled {
		// The directory first, as below.
		if err := a.cfg.QEMU.MkdirAll(a.vmDir(id)); err != nil {
			return result{}, fmt.Errorf("create VM directory: %w", err)
		}
		netStep = a.startNetwork(ctx, vm)
		diskStep = a.startDisk(ctx, vm, image)
		defer func() {
			if netStep != nil {
				netStep()
			}
			if diskStep != nil {
				diskStep.wait()
			}
		}()
	}

	dom, err := a.hv.Status(ctx, id)
	if err != nil {
		return result{}, fmt.Errorf("observe domain: %w", err)
	}
	if epoch := vm.GetStatus().GetAssignmentEpoch(); dom.Exists && dom.Epoch < epoch {
		// A copy of an earlier assignment: the VM moved away since (this
		// host was fenced) and came back. Destroy it before anything
		// starts; the new copy is built from the image, as on any host.
		a.log.Warn("domain of an earlier assignment epoch: removing it (files to the trash) before building the current one", "vm", id, "domain_epoch", dom.Epoch, "epoch", epoch)
		if netStep != nil {
			netStep() // its taps go with the copy's
			netStep = nil
		}
		if diskStep != nil {
			diskStep.wait() // its files go with the copy's
			diskStep = nil
		}
		if err := a.teardown(ctx, id, keepFiles); err != nil {
			return result{}, fmt.Errorf("remove copy of epoch %d: %w", dom.Epoch, err)
		}
		if dom, err = a.hv.Status(ctx, id); err != nil {
			return result{}, fmt.Errorf("observe domain: %w", err)
		}
	}
	if !dom.Exists && a.domainEverCreated(vm) {
		// The domain vanished behind our back. Report it; do not silently
		// recreate a VM whose disk state the user may care about.
		st.Phase = lifecycle.Error
		st.Reason, st.Message = lifecycle.ReasonDomainMissing, "the domain disappeared from the hypervisor; delete the VM or start it again"
		setCondition(st, lifecycle.ConditionDomainRunning, false, lifecycle.ReasonDomainMissing, st.Message)
		st.ObservedResourceVersion = lifecycleVersion(vm)
		return result{}, a.report(ctx, vm, st, reportStatus, warning(lifecycle.ReasonDomainMissing, st.Message))
	}
	// The directory first: every tap and domain of this agent is found
	// through it (observedVMIDs), and the network step below may make a
	// tap before the disk step is done.
	if err := a.cfg.QEMU.MkdirAll(a.vmDir(id)); err != nil {
		return result{}, fmt.Errorf("create VM directory: %w", err)
	}

	// The CREATING report is held back (creatingreport.go): a create that
	// ends soon sends it with its final report, one commit instead of two;
	// a slow one sends it on its own after a delay, beside the steps below;
	// a failing one sends it on the way out, before any other report.
	var creating *creatingReport
	if st.Phase == lifecycle.Scheduled {
		st.Phase = lifecycle.Creating
		creating = a.holdCreating(ctx, vm, st, normal(lifecycle.ReasonCreating, "creating the VM on host "+a.cfg.HostName))
		defer func() {
			if ferr := creating.flush(ctx); ferr != nil {
				err = errors.Join(err, ferr)
			}
		}()
	}
	// The disk and the network need nothing from one another, so they run
	// at once: each waits on something of its own (fsyncs of the overlay,
	// the nftables ruleset), and in a row they were most of a create's
	// control-plane time with ten at once on a loaded host
	// (hack/agentbench). Their outcomes are handled below in the order
	// they used to run, after both have ended.
	var (
		wg sync.WaitGroup
		// defined: this pass defined the domain (undefine undoes it).
		defined   bool
		defineErr error
	)
	configDrive := ""
	if vm.GetSpec().GetConfigDrive() {
		configDrive = a.configDrivePath(id)
	}
	// 4 (early). The domain is defined beside the overlay and the network
	// once its boot media are known: libvirt only records the definition
	// (its config written and synced, 4-12 ms of a create's critical path
	// in hack/agentbench when it waited for both), and needs the disk and
	// the taps only to start it. Only a domain observed absent is defined:
	// redefining one that exists would silently bring back a domain
	// someone removed since we looked. A pass that fails before the start
	// undefines what it defined (undefine below), so a refused network or
	// a failed disk leaves no domain behind, as when the define came last.
	defineNICs, nicErr := nic.FromVM(vm) // the NICs ensureNetwork plugs
	defineEarly := func(b bootMedia) {
		if dom.Exists || nicErr != nil {
			return
		}
		wg.Go(func() {
			measureCPU(ctx, func() { defineErr = a.hv.Define(ctx, a.domainSpec(vm, b, defineNICs, configDrive)) })
			defined = defineErr == nil
		})
	}
	undefine := func(err error) error {
		if !defined {
			return err
		}
		if uerr := a.hv.Undefine(ctx, id); uerr != nil {
			return errors.Join(err, fmt.Errorf("undo the define of a failed create: %w", uerr))
		}
		return err
	}
	// 1. Disk: the image cached by digest, the VM's overlay over it.
	if diskStep == nil {
		diskStep = a.startDisk(ctx, vm, image)
	}
	// 2. Network: bridges, taps with anti-spoofing. The guest services
	// (DHCP, DNS, metadata) are told below, once the disk is there too,
	// and before the domain starts: cloud-init's OpenStack datasource asks
	// only once.
	if netStep == nil {
		netStep = a.startNetwork(ctx, vm)
	}
	if b, ok := diskStep.resolved(); ok {
		defineEarly(b)
	}
	nw := netStep()
	nics, netErr, networkAt := nw.nics, nw.err, nw.at
	diskStep.wait()
	boot, diskErr, diskAt := diskStep.boot, diskStep.err, diskStep.at
	wg.Wait()
	if diskErr != nil {
		setCondition(st, lifecycle.ConditionDiskReady, false, lifecycle.ReasonDiskFailed, diskErr.Error())
		return result{}, undefine(diskErr)
	}
	if lifecycle.SetCondition(st, lifecycle.ConditionDiskReady, true, lifecycle.ReasonOverlayReady, "copy-on-write overlay over image "+vm.GetSpec().GetImage(), diskAt) {
		events = append(events, lifecycle.NewEvent(lifecycle.EventNormal, lifecycle.ReasonDiskReady, "disk overlay ready", diskAt))
	}
	if netErr != nil {
		setCondition(st, lifecycle.ConditionNetworkReady, false, lifecycle.ReasonNetworkFailed, netErr.Error())
		if err := undefine(nil); err != nil {
			return result{}, errors.Join(netErr, err)
		}
		if creating != nil {
			// networkRefused may report: CREATING goes first.
			if err := creating.flush(ctx); err != nil {
				return result{}, err
			}
		}
		return result{}, a.networkRefused(ctx, vm, st, netErr)
	}
	a.publishGuests(ctx, id)
	if lifecycle.SetCondition(st, lifecycle.ConditionNetworkReady, true, lifecycle.ReasonPortsReady, fmt.Sprintf("%d port(s) plugged", len(nics)), networkAt) {
		events = append(events, lifecycle.NewEvent(lifecycle.EventNormal, lifecycle.ReasonNetworkReady, "ports plugged into their bridges", networkAt))
	}
	if ev := a.metadataServed(vm, st); ev != nil {
		events = append(events, ev)
	}

	// 3. Config drive, when asked for.
	if configDrive != "" {
		if _, err := os.Stat(configDrive); errors.Is(err, os.ErrNotExist) {
			if err := a.guest.BuildConfigDrive(ctx, Guest{VM: vm, UserData: userData}, configDrive); err != nil {
				return result{}, undefine(fmt.Errorf("build config drive: %w", err))
			}
		} else if err != nil {
			return result{}, undefine(fmt.Errorf("check config drive: %w", err))
		}
	}

	// 4. Domain: defined above, beside the disk and the network; then the
	// power state converged.
	if defineErr != nil {
		return result{}, fmt.Errorf("define domain: %w", defineErr)
	}
	spec := a.domainSpec(vm, boot, nics, configDrive)
	res, powerEvents, err := a.convergePower(ctx, vm, st, dom)
	if err != nil {
		return result{}, err
	}
	events = append(events, powerEvents...)

	// 5. Guest readiness, as seen by the metadata service.
	if st.Phase == lifecycle.Running {
		if at, ok := a.guest.GuestSeen(id); ok {
			if setCondition(st, lifecycle.ConditionGuestReady, true, lifecycle.ReasonMetadataRead, "the guest read its metadata at "+at.UTC().Format(time.RFC3339)) {
				events = append(events, normal(lifecycle.ReasonGuestReady, "the guest read its metadata"))
			}
		}
		// Otherwise GuestActive requeues the VM when the metadata
		// service answers it for the first time.
	} else {
		setCondition(st, lifecycle.ConditionGuestReady, false, lifecycle.ReasonNotRunning, "")
	}
	st.Hypervisor = spec.Hypervisor
	st.ObservedResourceVersion = lifecycleVersion(vm)
	if creating != nil {
		ev, err := creating.fold()
		if err != nil {
			return result{}, err
		}
		if ev != nil {
			events = append([]*minicloudv1.Event{ev}, events...)
		}
	}
	return res, a.report(ctx, vm, st, reportStatus, events...)
}

// convergePower starts, stops or reboots the domain as the spec asks.
func (a *Agent) convergePower(ctx context.Context, vm *minicloudv1.VM, st *minicloudv1.VMStatus, dom hypervisor.DomainStatus) (result, []*minicloudv1.Event, error) {
	id := vm.GetMeta().GetId()
	spec := vm.GetSpec()
	// acted: the host already converged this very spec version once. A
	// domain that is down now although the spec says running was then shut
	// down from inside (or crashed): report it, don't fight the guest.
	acted := a.observedStatus(vm).GetObservedResourceVersion() == lifecycleVersion(vm) && a.domainEverCreated(vm)
	var events []*minicloudv1.Event
	running := dom.Exists && dom.Running

	switch spec.GetPowerState() {
	case minicloudv1.PowerState_POWER_STATE_STOPPED:
		if running {
			if err := a.hv.Shutdown(ctx, id, a.cfg.ShutdownTimeout); err != nil {
				return result{}, nil, fmt.Errorf("shut down domain: %w", err)
			}
			events = append(events, normal(lifecycle.ReasonStopped, "domain shut down"))
		}
		st.Phase = lifecycle.Stopped
		st.Reason, st.Message = lifecycle.ReasonStopped, "stopped by request"
		setCondition(st, lifecycle.ConditionDomainRunning, false, lifecycle.ReasonStopped, "")
		return result{}, events, nil
	default:
		restarted := false
		if !running && acted {
			reason, restart := a.unexpectedStop(vm, dom)
			how := "the domain stopped without a request (" + dom.State + "/" + dom.Reason + ")"
			if reason == lifecycle.ReasonHostFenced {
				how = "the host fenced itself (no contact with the API) and destroyed the domain"
			}
			var wait time.Duration
			if restart {
				if wait, restart = a.restartAllowed(id); restart {
					if err := a.hv.Start(ctx, id); err != nil {
						return result{}, nil, fmt.Errorf("restart domain: %w", err)
					}
					a.forgetFenceStop(id)
					restarted = true
					events = append(events, warning(lifecycle.ReasonRestarted, how+"; started again (restart policy on-failure)"))
				}
			}
			if !restarted {
				st.Phase = lifecycle.Stopped
				st.Reason, st.Message = reason, how+"; `minicloud vm start` starts it again"
				if wait > 0 {
					st.Message = fmt.Sprintf("%s; restarted less than %s ago, next attempt in %s", how, restartInterval, wait.Round(time.Second))
				}
				if setCondition(st, lifecycle.ConditionDomainRunning, false, reason, st.Message) {
					events = append(events, warning(reason, st.Message))
				}
				return result{RequeueAfter: wait}, events, nil
			}
		}
		switch {
		case restarted: // a fresh boot is the reboot too
		case !running:
			if err := a.hv.Start(ctx, id); err != nil {
				return result{}, nil, fmt.Errorf("start domain: %w", err)
			}
			a.forgetFenceStop(id)
			events = append(events, normal(lifecycle.ReasonStarted, "domain started under "+a.hypervisorKind))
		case spec.GetRebootGeneration() > vm.GetStatus().GetObservedRebootGeneration():
			if err := a.hv.Reboot(ctx, id); err != nil {
				return result{}, nil, fmt.Errorf("reboot domain: %w", err)
			}
			events = append(events, normal(lifecycle.ReasonRebooted, "domain rebooted"))
		}
		st.ObservedRebootGeneration = spec.GetRebootGeneration()
		st.Phase = lifecycle.Running
		st.Reason, st.Message = lifecycle.ReasonRunning, ""
		setCondition(st, lifecycle.ConditionDomainRunning, true, lifecycle.ReasonRunning, "")
		return result{}, events, nil
	}
}

// bootMedia is what the domain boots from.
type bootMedia struct {
	diskPath, diskFormat    string
	kernel, initrd, cmdline string
}

// lookupImage starts the lookup of vm's image record and returns its
// answer's future.
func (a *Agent) lookupImage(ctx context.Context, vm *minicloudv1.VM) func() (*minicloudv1.Image, error) {
	type answer struct {
		img *minicloudv1.Image
		err error
	}
	ch := make(chan answer, 1) // the lookup ends on its own if nobody waits
	go measureCPU(ctx, func() {
		img, err := a.imageRecords.lookup(ctx, vm.GetMeta().GetId(), vm.GetSpec().GetImage())
		ch <- answer{img, err}
	})
	return sync.OnceValues(func() (*minicloudv1.Image, error) {
		r := <-ch
		return r.img, r.err
	})
}

// ensureDisk makes the VM's disk from the image record image answers. It
// calls resolved with the boot media once they are known, before the
// overlay is made (the domain can be defined meanwhile).
func (a *Agent) ensureDisk(ctx context.Context, vm *minicloudv1.VM, image func() (*minicloudv1.Image, error), resolved func(bootMedia)) (bootMedia, error) {
	id := vm.GetMeta().GetId()
	img, err := image()
	if err != nil {
		if errdefs.IsNotFound(errdefs.FromGRPC(err)) {
			return bootMedia{}, Permanent(lifecycle.ReasonImageNotFound, fmt.Errorf("image %q no longer exists", vm.GetSpec().GetImage()))
		}
		return bootMedia{}, fmt.Errorf("get image %s: %w", vm.GetSpec().GetImage(), err)
	}
	fetch := func(part minicloudv1.ImagePart, blob *minicloudv1.ImageBlob) (string, error) {
		if blob.GetSha256() == "" {
			return "", nil
		}
		p, err := a.cache.Ensure(ctx, img.GetMeta().GetName(), part, blob.GetSha256())
		if err != nil {
			// A digest mismatch or a blob the API no longer has will not
			// heal by retrying on this host.
			if errdefs.IsFailedPrecondition(err) || errdefs.IsInvalid(err) || errdefs.IsNotFound(err) {
				return "", Permanent(lifecycle.ReasonImageUnusable, fmt.Errorf("image %s: %w", img.GetMeta().GetName(), err))
			}
			return "", fmt.Errorf("fetch image %s: %w", img.GetMeta().GetName(), err)
		}
		return p, nil
	}
	var b bootMedia
	backing, err := fetch(minicloudv1.ImagePart_IMAGE_PART_DISK, img.GetDisk())
	if err != nil {
		return b, err
	}
	if backing == "" {
		return b, Permanent(lifecycle.ReasonImageInvalid, fmt.Errorf("image %s has no disk", img.GetMeta().GetName()))
	}
	if b.kernel, err = fetch(minicloudv1.ImagePart_IMAGE_PART_KERNEL, img.GetKernel()); err != nil {
		return b, err
	}
	if b.initrd, err = fetch(minicloudv1.ImagePart_IMAGE_PART_INITRD, img.GetInitrd()); err != nil {
		return b, err
	}
	b.cmdline = img.GetCmdline()

	size := vm.GetSpec().GetResources().GetDiskGib() << 30
	if virt := img.GetVirtualSizeBytes(); virt > size {
		return b, Permanent(lifecycle.ReasonFlavorTooSmall, fmt.Errorf("flavor %s has a %d GiB disk but image %s needs %d bytes",
			vm.GetSpec().GetFlavor(), vm.GetSpec().GetResources().GetDiskGib(), img.GetMeta().GetName(), virt))
	}
	format := "raw"
	if img.GetFormat() == minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2 {
		format = "qcow2"
	}
	b.diskPath, b.diskFormat = a.diskPath(id), "qcow2"
	resolved(b)
	if err := a.disks.CreateOverlay(ctx, b.diskPath, backing, format, size); err != nil {
		// Invalid: the cached image's bytes are not what its record says,
		// or refer to other files (docs/security.md, "Untrusted images").
		// No retry or other host will do better.
		if errdefs.IsInvalid(err) {
			return b, Permanent(lifecycle.ReasonImageUnusable, fmt.Errorf("image %s: %w", img.GetMeta().GetName(), err))
		}
		return b, fmt.Errorf("create disk overlay: %w", err)
	}
	return b, nil
}

// diskStep is ensureDisk run on a goroutine of its own.
type diskStep struct {
	media chan bootMedia // the boot media, once known (buffered)
	done  chan struct{}  // closed when ensureDisk returned
	// Set before done is closed:
	boot bootMedia
	err  error
	at   time.Time
}

// startDisk starts ensureDisk.
func (a *Agent) startDisk(ctx context.Context, vm *minicloudv1.VM, image func() (*minicloudv1.Image, error)) *diskStep {
	d := &diskStep{media: make(chan bootMedia, 1), done: make(chan struct{})}
	go measureCPU(ctx, func() {
		d.boot, d.err = a.ensureDisk(ctx, vm, image, func(b bootMedia) { d.media <- b })
		d.at = time.Now()
		close(d.done)
	})
	return d
}

// resolved waits until the step knows the boot media (before the overlay
// is made) and returns them; ok is false when it ended without them.
func (d *diskStep) resolved() (b bootMedia, ok bool) {
	select {
	case b = <-d.media:
		return b, true
	case <-d.done:
		select {
		case b = <-d.media:
			return b, true
		default:
			return bootMedia{}, false
		}
	}
}

// wait waits until ensureDisk returned.
func (d *diskStep) wait() { <-d.done }

// networkOutcome is how ensureNetwork ended, and when.
type networkOutcome struct {
	nics []nic.NIC
	err  error
	at   time.Time
}

// startNetwork runs ensureNetwork on a goroutine of its own and returns
// its outcome's future.
func (a *Agent) startNetwork(ctx context.Context, vm *minicloudv1.VM) func() networkOutcome {
	ch := make(chan networkOutcome, 1)
	go measureCPU(ctx, func() {
		nics, err := a.ensureNetwork(ctx, vm)
		ch <- networkOutcome{nics: nics, err: err, at: time.Now()}
	})
	return sync.OnceValue(func() networkOutcome { return <-ch })
}

func (a *Agent) ensureNetwork(ctx context.Context, vm *minicloudv1.VM) ([]nic.NIC, error) {
	nics, err := nic.FromVM(vm)
	if err != nil {
		return nil, Permanent(lifecycle.ReasonAddressInvalid, err)
	}
	for _, n := range nics {
		if !n.Gateway.IsValid() {
			return nil, Permanent(lifecycle.ReasonAddressInvalid, fmt.Errorf("network %s: no gateway", n.Network))
		}
		// The network's host-side settings (NAT, tunnel) ride on the
		// address; the NIC is what was parsed from it.
		addr := vm.GetStatus().GetAddresses()[n.Index]
		tunnel := a.tunnelSpec(addr)
		if tunnel != nil {
			if err := a.checkTunnelMTU(addr, n.MTU); err != nil {
				return nil, err
			}
		}
		if err := a.ensureBridge(ctx, network.BridgeSpec{
			Name:        n.Bridge,
			GatewayCIDR: n.GatewayPrefix(),
			MTU:         n.MTU,
			NAT:         !addr.GetDisableNat(),
			Tunnel:      tunnel,
		}); err != nil {
			return nil, fmt.Errorf("bridge %s of network %s: %w", n.Bridge, n.Network, err)
		}
		if tunnel != nil {
			if err := a.applyRemotePorts(ctx, n.Bridge); err != nil {
				return nil, fmt.Errorf("tunnel of network %s: %w", n.Network, err)
			}
		}
		if err := a.net.EnsurePort(ctx, network.PortSpec{
			VMID: vm.GetMeta().GetId(), TapName: n.TapName, Bridge: n.Bridge,
			MAC: n.MAC, IP: n.IP(), MTU: n.MTU,
		}); err != nil {
			return nil, fmt.Errorf("port %s on %s: %w", n.TapName, n.Bridge, err)
		}
	}
	return nics, nil
}

func (a *Agent) domainSpec(vm *minicloudv1.VM, b bootMedia, nics []nic.NIC, configDrive string) hypervisor.DomainSpec {
	id := vm.GetMeta().GetId()
	return hypervisor.DomainSpec{
		VMID:            id,
		Epoch:           vm.GetStatus().GetAssignmentEpoch(),
		Name:            vm.GetMeta().GetName(),
		Project:         vm.GetMeta().GetProject(),
		VCPUs:           int(vm.GetSpec().GetResources().GetVcpus()),
		MemoryMiB:       vm.GetSpec().GetResources().GetMemoryMib(),
		Hypervisor:      a.hypervisorKind,
		DiskPath:        b.diskPath,
		DiskFormat:      b.diskFormat,
		KernelPath:      b.kernel,
		InitrdPath:      b.initrd,
		Cmdline:         b.cmdline,
		ConfigDrivePath: configDrive,
		NICs:            nics,
		ConsoleLogPath:  a.consoleLogPath(id),
		SMBIOS: hypervisor.SMBIOS{
			// "OpenStack Nova" makes cloud-init's ds-identify pick the
			// OpenStack datasource; the UUID is the instance id.
			Manufacturer: "minicloud",
			Product:      "OpenStack Nova",
			Version:      "minicloud",
			Serial:       id,
			UUID:         id,
			Family:       "Virtual Machine",
		},
	}
}

// ensureBridge creates a network's bridge, recorded as this agent's, under
// bridgeMu so that collectBridges never removes a bridge being plugged into.
func (a *Agent) ensureBridge(ctx context.Context, spec network.BridgeSpec) error {
	a.bridgeMu.RLock()
	defer a.bridgeMu.RUnlock()
	if err := a.claimBridge(spec.Name); err != nil {
		return err
	}
	return a.net.EnsureBridge(ctx, spec)
}

// What teardown does with a VM's files.
type filesFate bool

const (
	removeFiles filesFate = false // the VM was deleted (or failed for good)
	keepFiles   filesFate = true  // the VM vanished from the API: trash them
)

// teardown removes everything the host holds for a VM: domain, port
// forwards, disk, config drive, console log and taps (the files to the trash with
// keepFiles). Each step is a no-op when already done, so an interrupted
// teardown is finished by the next call.
func (a *Agent) teardown(ctx context.Context, id string, files filesFate) error {
	a.imageRecords.forget(id)
	if err := a.hv.Destroy(ctx, id); err != nil {
		return fmt.Errorf("destroy domain: %w", err)
	}
	if err := a.hv.Undefine(ctx, id); err != nil {
		return fmt.Errorf("undefine domain: %w", err)
	}
	if err := a.deleteForwardsOf(ctx, id); err != nil {
		return err
	}
	ports, err := a.net.ListPorts(ctx)
	if err != nil {
		return fmt.Errorf("list ports: %w", err)
	}
	prefix := nic.TapNamePrefix(id)
	for _, p := range ports {
		if p.VMID == id || strings.HasPrefix(p.TapName, prefix) {
			if err := a.net.DeletePort(ctx, p.TapName); err != nil {
				return fmt.Errorf("delete port %s: %w", p.TapName, err)
			}
		}
	}
	// The disks go with the directory, moved or removed: what package disk
	// remembers of them goes too.
	a.disks.ForgetUnder(a.vmDir(id))
	if files == keepFiles {
		if _, err := os.Stat(a.vmDir(id)); err == nil {
			if err := os.MkdirAll(a.trashDir(), 0o700); err != nil {
				return fmt.Errorf("trash: %w", err)
			}
			// A rename within the state directory: atomic, and the disk is
			// not copied.
			dst := filepath.Join(a.trashDir(), fmt.Sprintf("%s.%d", id, time.Now().Unix()))
			if err := os.Rename(a.vmDir(id), dst); err != nil {
				return fmt.Errorf("move VM directory to the trash: %w", err)
			}
		}
		return nil
	}
	if err := os.RemoveAll(a.vmDir(id)); err != nil {
		return fmt.Errorf("remove VM directory: %w", err)
	}
	return nil
}

// trashDir keeps the files of VMs that vanished from the API.
func (a *Agent) trashDir() string { return filepath.Join(a.cfg.StateDir, "trash") }

// emptyTrash removes trashed VM directories older than Config.TrashGrace.
func (a *Agent) emptyTrash() {
	entries, err := os.ReadDir(a.trashDir())
	if err != nil {
		return
	}
	for _, e := range entries {
		_, stamp, ok := strings.Cut(e.Name(), ".")
		secs, err := strconv.ParseInt(stamp, 10, 64)
		if !ok || err != nil || time.Since(time.Unix(secs, 0)) < a.cfg.TrashGrace {
			continue
		}
		if err := os.RemoveAll(filepath.Join(a.trashDir(), e.Name())); err != nil {
			a.log.Warn("empty trash", "entry", e.Name(), "err", err)
		} else {
			a.log.Info("trashed VM files removed after the grace period", "entry", e.Name())
		}
	}
}

// observedVMIDs lists the VMs this agent holds something for on the host:
// its VM directories. converge creates a VM's directory before its first
// tap or domain, and teardown removes it after the last, so every domain
// and tap this agent made is found through its directory — and a domain of
// some other minicloud on the same libvirt (a second cloud, a test) is
// never mistaken for an orphan of ours.
func (a *Agent) observedVMIDs() []string {
	entries, err := os.ReadDir(filepath.Join(a.cfg.StateDir, "vms"))
	if err != nil {
		a.log.Warn("list VM directories", "err", err)
		return nil
	}
	ids := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.IsDir() {
			ids = append(ids, e.Name())
		}
	}
	return ids
}

func (a *Agent) vmDir(id string) string           { return filepath.Join(a.cfg.StateDir, "vms", id) }
func (a *Agent) diskPath(id string) string        { return filepath.Join(a.vmDir(id), "disk.qcow2") }
func (a *Agent) configDrivePath(id string) string { return filepath.Join(a.vmDir(id), "config.iso") }
func (a *Agent) consoleLogPath(id string) string  { return filepath.Join(a.vmDir(id), "console.log") }
