package agent

import (
	"context"
	"errors"
	"io"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/wait"
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
		if !wait.Sleep(ctx, backoff) {
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
			a.guestsDirty[id] = true
			a.mu.Unlock()
			if known && prev.vm.GetMeta().GetResourceVersion() != ev.GetVm().GetMeta().GetResourceVersion() {
				// A spec write (e.g. new labels, tags, metadata or SSH
				// keys): the guest sees it now, not after the reconcile
				// below has looked at disk, network and domain.
				a.publishGuests(ctx)
			}
			// Queued before the forwards are synced: that reads the host's
			// DNAT map (an nftables dump), which a create's reconcile need
			// not wait for (0.3-3 ms of one create in hack/agentbench).
			a.queue.Add(id)
			if synced && forwardsMayChange(prev, known, ev.GetVm()) {
				a.syncForwardsLogged(ctx)
			}
			if synced {
				a.assignmentsChanged()
			}
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
			id := ev.GetVm().GetMeta().GetId()
			a.mu.Lock()
			delete(a.assigned, id)
			delete(a.reported, id)
			a.guestsDirty[id] = true
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
					a.guestsDirty[id] = true
					a.queue.Add(id)
				}
			}
			first := !a.synced
			a.synced = true
			for id := range a.cachedGuests {
				a.guestsDirty[id] = true
			}
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

// assignedOnOneStream says VMs id and other are both assigned to this host
// as delivered by one assignment stream (imagerecords.go relies on its
// order: a VM's removal comes before any VM created after it).
func (a *Agent) assignedOnOneStream(id, other string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	as, ok := a.assigned[id]
	o, ook := a.assigned[other]
	return ok && ook && as.seen == o.seen
}

// forwardsMayChange says whether an assignment event can change the host's
// port forwards: a spec write (expose, unexpose, delete) or a new VM with
// forwards. A new VM without any changes nothing: no forward is wanted for
// it, and none of its id is left on the host (teardown removes a VM's
// forwards with it, and the full sync at every BOOKMARK catches the rest).
func forwardsMayChange(prev *assignment, known bool, vm *minicloudv1.VM) bool {
	if !known {
		return len(vm.GetSpec().GetPortForwards()) > 0
	}
	return prev.vm.GetMeta().GetResourceVersion() != vm.GetMeta().GetResourceVersion()
}

// publishGuests hands the guest services (DHCP, DNS, metadata) what changed
// since the last publish: the VMs marked in a.guestsDirty, and ids (the VM
// a reconcile pass is about, so that each pass re-asserts its own VM). A
// VM assigned and not being deleted is served as assigned, else as saved
// on disk until the first BOOKMARK (assignmentcache.go), else removed. The
// other VMs are not looked at: the cost does not grow with their number.
func (a *Agent) publishGuests(ctx context.Context, ids ...string) {
	// One publisher at a time, changes taken under the same lock, so an
	// older state can never overwrite a newer one.
	a.publishMu.Lock()
	defer a.publishMu.Unlock()
	a.mu.Lock()
	for _, id := range ids {
		a.guestsDirty[id] = true
	}
	var upsert []Guest
	var remove []string
	for id := range a.guestsDirty {
		if g, ok := a.guestLocked(id); ok {
			upsert = append(upsert, g)
		} else {
			remove = append(remove, id)
		}
	}
	clear(a.guestsDirty)
	a.mu.Unlock()
	if err := a.guest.UpdateGuests(ctx, upsert, remove); err != nil {
		a.log.Warn("update guest services", "err", err)
	}
}

// guestLocked is what the guest services should serve for VM id, if
// anything. a.mu must be held.
func (a *Agent) guestLocked(id string) (Guest, bool) {
	if as, live := a.assigned[id]; live {
		if as.vm.GetSpec().GetDeletionRequested() {
			return Guest{}, false
		}
		return Guest{VM: as.vm, UserData: as.userData}, true
	}
	g, cached := a.cachedGuests[id] // only until the first BOOKMARK
	if !cached || g.VM.GetSpec().GetDeletionRequested() {
		return Guest{}, false
	}
	return g, true
}
