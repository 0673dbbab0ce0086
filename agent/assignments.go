package agent

import (
	"context"
	"errors"
	"io"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// watchAssignments keeps a.assigned equal to the API's set of VMs for this
// host. Each (re)connection starts with the full set, closed by a BOOKMARK:
// VMs not delivered again by then are no longer ours and get cleaned up.
func (a *Agent) watchAssignments(ctx context.Context) error {
	// The API only streams assignments of a registered host.
	select {
	case <-a.registered:
	case <-ctx.Done():
		return nil
	}
	var generation uint64
	backoff := time.Second
	for ctx.Err() == nil {
		generation++
		synced, err := a.streamAssignments(ctx, generation)
		if ctx.Err() != nil {
			return nil
		}
		if synced {
			// The stream worked until its API replica went away: reconnect
			// (to another replica, if there are several) without the
			// backoff earned by earlier failures.
			backoff = time.Second
		}
		if err != nil && !errors.Is(err, io.EOF) {
			a.log.Warn("assignment stream broke; reconnecting", "err", errdefs.FromGRPC(err), "in", backoff)
		}
		if !sleepCtx(ctx, backoff) {
			return nil
		}
		backoff = min(backoff*2, 10*time.Second)
	}
	return nil
}

// streamAssignments runs one stream; synced says whether it delivered a
// full set (its BOOKMARK) before it ended.
func (a *Agent) streamAssignments(ctx context.Context, generation uint64) (synced bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	started := a.assignmentStream(cancel)
	stream, err := a.hosts.WatchAssignments(ctx, &minicloudv1.WatchAssignmentsRequest{Host: a.cfg.HostName})
	if err != nil {
		return false, err
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			return synced, err
		}
		switch ev.GetType() {
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED:
			id := ev.GetVm().GetMeta().GetId()
			a.mu.Lock()
			userData := ev.GetUserData()
			prev, known := a.assigned[id]
			if known && userData == nil {
				// User-data never changes; the API sends it with ADDED only.
				userData = prev.userData
			}
			a.assigned[id] = &assignment{vm: ev.GetVm(), userData: userData, seen: generation}
			a.mu.Unlock()
			if known && prev.vm.GetMeta().GetResourceVersion() != ev.GetVm().GetMeta().GetResourceVersion() {
				// A spec write (e.g. new labels, tags, metadata or SSH
				// keys): the guest sees it now, not after the reconcile
				// below has looked at disk, network and domain.
				a.publishGuests(ctx)
			}
			if synced && (!known || prev.vm.GetMeta().GetResourceVersion() != ev.GetVm().GetMeta().GetResourceVersion()) {
				// A new VM or a spec write (expose, unexpose, delete).
				a.syncForwardsLogged(ctx)
			}
			a.queue.Add(id)
			if synced {
				a.assignmentsChanged()
			}
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
			id := ev.GetVm().GetMeta().GetId()
			a.mu.Lock()
			delete(a.assigned, id)
			delete(a.reported, id)
			if ev.GetReleased() {
				// It left this host while it was fenced: destroy it
				// before anything starts (reconcile does, first thing).
				a.released[id] = true
			}
			a.mu.Unlock()
			a.queue.Add(id)
			a.publishGuests(ctx)
			if synced {
				a.syncForwardsLogged(ctx)
				a.assignmentsChanged()
			}
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK:
			synced = true
			a.mu.Lock()
			for id, as := range a.assigned {
				if as.seen != generation {
					delete(a.assigned, id)
					a.queue.Add(id)
				}
			}
			first := !a.synced
			a.synced = true
			a.cachedGuests = nil // the live set replaces the saved one
			a.mu.Unlock()
			a.publishGuests(ctx)
			a.syncForwardsLogged(ctx)
			a.assignmentsChanged()
			a.liftFence(started)
			if first {
				a.log.Info("assignments synced; cleaning up anything else found on the host")
			}
			a.enqueueAll()
		}
	}
}

// publishGuests hands the guest services (DHCP, DNS, metadata) the current
// set of this host's VMs.
func (a *Agent) publishGuests(ctx context.Context) {
	// One publisher at a time, snapshot taken under the same lock, so an
	// older set can never overwrite a newer one.
	a.publishMu.Lock()
	defer a.publishMu.Unlock()
	a.mu.Lock()
	guests := make([]Guest, 0, len(a.assigned))
	for _, as := range a.assigned {
		if as.vm.GetSpec().GetDeletionRequested() {
			continue
		}
		guests = append(guests, Guest{VM: as.vm, UserData: as.userData})
	}
	for _, g := range a.cachedGuests { // only until the first BOOKMARK
		if _, live := a.assigned[g.VM.GetMeta().GetId()]; !live && !g.VM.GetSpec().GetDeletionRequested() {
			guests = append(guests, g)
		}
	}
	a.mu.Unlock()
	if err := a.guest.SetGuests(ctx, guests); err != nil {
		a.log.Warn("update guest services", "err", err)
	}
}
