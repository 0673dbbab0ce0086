package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// Self-fencing (Nomad's stop_after_client_disconnect, Pacemaker's "no
// recovery without fencing"): an agent that has not renewed its host's
// lease for Config.FenceAfter — shorter than the lease — destroys every
// domain it runs and starts none until it is back in contact AND has
// received a full assignment set (a BOOKMARK) on a stream opened after
// that contact, so it knows which VMs are still its own: the control plane
// may have counted the host FENCED meanwhile (store.FenceDeadline) and
// moved its VMs elsewhere. Domains stay defined and disks stay: a VM still
// assigned here starts again (HostFenced), one released is removed.

// fenceCheckPeriod is how often the agent compares the time since its last
// contact with FenceAfter; store.FenceMargin allows for it.
const fenceCheckPeriod = 500 * time.Millisecond

// fenceState is the agent's self-fencing state, under its own lock.
type fenceState struct {
	mu sync.Mutex
	// lastContact is the last successful registration or heartbeat (the
	// agent's start before the first).
	lastContact time.Time
	fenced      bool
	// contactBack is the first successful heartbeat since fenced.
	contactBack time.Time
	// cancelStream ends the current assignment stream, so that the next
	// one starts after contact is back.
	cancelStream context.CancelFunc
}

// contact records a successful registration or heartbeat.
func (a *Agent) contact() {
	a.touchLastContact()
	f := &a.fence
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastContact = time.Now()
	if f.fenced && f.contactBack.IsZero() {
		f.contactBack = f.lastContact
		a.log.Warn("back in contact with the API while fenced; waiting for a fresh assignment set before starting anything")
		if f.cancelStream != nil {
			f.cancelStream()
		}
	}
}

// fenced says whether the agent must not start or report anything.
func (a *Agent) fenced() bool {
	a.fence.mu.Lock()
	defer a.fence.mu.Unlock()
	return a.fence.fenced
}

// assignmentStream registers the cancel function of a new assignment
// stream and returns when it started.
func (a *Agent) assignmentStream(cancel context.CancelFunc) time.Time {
	a.fence.mu.Lock()
	defer a.fence.mu.Unlock()
	a.fence.cancelStream = cancel
	return time.Now()
}

// liftFence ends the fence on the BOOKMARK of a stream that started after
// contact came back: the set it delivered is the API's word on what is
// still this host's (anything released was sent before the BOOKMARK).
func (a *Agent) liftFence(streamStart time.Time) {
	f := &a.fence
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.fenced || f.contactBack.IsZero() || !streamStart.After(f.contactBack) {
		return
	}
	f.fenced, f.contactBack = false, time.Time{}
	a.log.Warn("fence lifted: the assignment set is fresh; VMs still assigned here start again")
}

// fenceStoppedFile marks, in a VM's directory, that a fence (the agent's
// or the fence guard's) destroyed its domain: a file, so an agent that
// restarts still tells the fence's stop from one made on purpose.
const fenceStoppedFile = "fence-stopped"

// markFenceStop records that a fence destroyed the domain of the VM whose
// directory is vmDir.
func markFenceStop(vmDir string) error {
	return os.WriteFile(filepath.Join(vmDir, fenceStoppedFile), nil, 0o600)
}

// stoppedByFence says whether a fence destroyed id's domain (and it has
// not been started since).
func (a *Agent) stoppedByFence(id string) bool {
	_, err := os.Stat(filepath.Join(a.vmDir(id), fenceStoppedFile))
	return err == nil
}

func (a *Agent) forgetFenceStop(id string) {
	if err := os.Remove(filepath.Join(a.vmDir(id), fenceStoppedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("forget fence stop", "vm", id, "err", err)
	}
}

// fenceLoop fences the host when contact has been lost for FenceAfter, and
// while fenced keeps every domain of this agent's VMs down.
func (a *Agent) fenceLoop(ctx context.Context) error {
	if a.cfg.FenceAfter <= 0 {
		return nil
	}
	t := time.NewTicker(fenceCheckPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		f := &a.fence
		f.mu.Lock()
		if !f.fenced && time.Since(f.lastContact) > a.cfg.FenceAfter {
			f.fenced, f.contactBack = true, time.Time{}
			a.log.Error("no contact with the API for longer than --fence-after: fencing this host (destroying its domains; nothing starts until the API confirms which VMs are still ours)",
				"last_contact", f.lastContact, "fence_after", a.cfg.FenceAfter)
			if f.cancelStream != nil {
				f.cancelStream()
			}
		}
		fenced := f.fenced
		f.mu.Unlock()
		if fenced {
			a.destroyAllDomains(ctx)
		}
	}
}

// destroyAllDomains destroys (not undefines) every running domain of this
// agent's VMs. A failure is retried on the next tick.
func (a *Agent) destroyAllDomains(ctx context.Context) {
	fenceStopDomains(ctx, a.hv, a.observedVMIDs(), a.vmDir, a.log.With("by", "agent"))
}

// fenceStopDomains destroys (not undefines) the running domains among ids,
// each marked fence-stopped first so the restart policy later tells it from
// a domain stopped on purpose. The agent and the fence guard both fence
// through it, so the two cannot disagree on what fencing leaves behind.
func fenceStopDomains(ctx context.Context, hv hypervisor.Driver, ids []string, vmDir func(id string) string, log *slog.Logger) {
	for _, id := range ids {
		dom, err := hv.Status(ctx, id)
		if err != nil || !dom.Running {
			if err != nil {
				log.Warn("fenced: observe domain", "vm", id, "err", err)
			}
			continue
		}
		// Marked first: a destroyed domain without the mark would look
		// destroyed on purpose, and stay down.
		if err := markFenceStop(vmDir(id)); err != nil {
			log.Error("fenced: mark VM; destroying its domain anyway", "vm", id, "err", err)
		}
		if err := hv.Destroy(ctx, id); err != nil {
			log.Error("fenced: destroy domain failed; retrying", "vm", id, "err", err)
			continue
		}
		log.Warn("fenced: domain destroyed", "vm", id)
	}
}

// releaseVM removes what the host holds of a VM that left it while it was
// fenced (evacuated or force-deleted): its files go to the trash, as for
// any VM that vanished, and the API is told so it drops the record.
func (a *Agent) releaseVM(ctx context.Context, id string) error {
	if err := a.teardown(ctx, id, keepFiles); err != nil {
		return err
	}
	if _, err := a.hosts.ReportVMStatus(ctx, &minicloudv1.ReportVMStatusRequest{Host: a.cfg.HostName, VmId: id, ReleasedConfirmed: true}); err != nil {
		return fmt.Errorf("confirm release of VM %s: %w", id, errdefs.FromGRPC(err))
	}
	a.mu.Lock()
	delete(a.released, id)
	a.mu.Unlock()
	a.forgetFenceStop(id)
	a.log.Warn("VM released by the control plane while this host was fenced: domain removed, files in the trash", "vm", id)
	return nil
}

// restartInterval bounds how often the host restarts a VM that keeps
// stopping unexpectedly (a crash loop).
const restartInterval = time.Minute

// unexpectedStop returns why a domain the spec wants running is down, and
// whether the restart policy restarts it: a guest that shut itself down
// stays down, and so does a domain someone destroyed outside minicloud;
// one destroyed by the fence, crashed, or gone with its QEMU or libvirtd
// (a host reboot: libvirt says failed or unknown) is restarted under
// ON_FAILURE.
func (a *Agent) unexpectedStop(vm *minicloudv1.VM, dom hypervisor.DomainStatus) (reason string, restart bool) {
	id := vm.GetMeta().GetId()
	switch {
	case a.stoppedByFence(id):
		reason = lifecycle.ReasonHostFenced
	case dom.Reason == "shutdown":
		return lifecycle.ReasonStoppedByGuest, false
	case dom.Reason == "destroyed":
		// Someone powered it off on purpose (virsh destroy): not ours to
		// undo. The host's own destroys are the fence's, handled above.
		return lifecycle.ReasonStoppedUnexpectedly, false
	case dom.State == hypervisor.StateCrashed || dom.Reason == "crashed":
		reason = lifecycle.ReasonCrashed
	default:
		reason = lifecycle.ReasonStoppedUnexpectedly
	}
	return reason, vm.GetSpec().GetRestartPolicy() != minicloudv1.RestartPolicy_RESTART_POLICY_NEVER
}

// restartAllowed says whether a restart of id is due now, or how long to
// wait for the next one.
func (a *Agent) restartAllowed(id string) (time.Duration, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if last, ok := a.restarts[id]; ok {
		if wait := restartInterval - time.Since(last); wait > 0 {
			return wait, false
		}
	}
	a.restarts[id] = time.Now()
	return 0, true
}
