package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// vmState is what one watch has seen of a VM.
type vmState struct {
	id      string
	vm      *minicloudv1.VM // last version seen
	running time.Time       // when the watch first delivered phase RUNNING
	ready   time.Time       // when it first delivered RUNNING with GuestReady true
	failed  string          // reason and message of an ERROR phase
	deleted bool
}

// watcher follows WatchVMs for the whole run: the moment a VM's RUNNING
// phase reaches the client is the end of its create as a user sees it.
type watcher struct {
	mu      sync.Mutex
	vms     map[string]*vmState // by name
	err     error               // the stream broke
	changed chan struct{}
}

func newWatcher() *watcher {
	return &watcher{vms: map[string]*vmState{}, changed: make(chan struct{}, 1)}
}

func (w *watcher) run(ctx context.Context, vms minicloudv1.VMServiceClient) {
	stream, err := vms.WatchVMs(ctx, &minicloudv1.WatchVMsRequest{})
	for err == nil {
		var ev *minicloudv1.WatchVMsResponse
		if ev, err = stream.Recv(); err != nil {
			break
		}
		now := time.Now()
		vm := ev.GetVm()
		if vm == nil {
			continue
		}
		w.mu.Lock()
		st := w.vms[vm.GetMeta().GetName()]
		if st == nil {
			st = &vmState{}
			w.vms[vm.GetMeta().GetName()] = st
		}
		st.id = vm.GetMeta().GetId()
		switch {
		case ev.GetType() == minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
			st.deleted = true
		case vm.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_RUNNING:
			st.vm = vm
			if st.running.IsZero() {
				st.running = now
			}
			if st.ready.IsZero() && guestReady(vm) {
				st.ready = now
			}
		case vm.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_ERROR:
			st.vm = vm
			st.failed = vm.GetStatus().GetReason() + ": " + vm.GetStatus().GetMessage()
		default:
			st.vm = vm
		}
		w.mu.Unlock()
		w.notify()
	}
	w.mu.Lock()
	if ctx.Err() == nil {
		w.err = fmt.Errorf("VM watch broke: %w", err)
	}
	w.mu.Unlock()
	w.notify()
}

func (w *watcher) notify() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// state returns a copy of what the watch knows of a VM.
func (w *watcher) state(name string) vmState {
	w.mu.Lock()
	defer w.mu.Unlock()
	if st := w.vms[name]; st != nil {
		return *st
	}
	return vmState{}
}

// guestReady says whether the VM's GuestReady condition is true: its
// guest fetched its metadata.
func guestReady(vm *minicloudv1.VM) bool {
	return lifecycle.ConditionTrue(vm.GetStatus(), lifecycle.ConditionGuestReady)
}

// wait blocks until done holds for every VM in names, a VM fails, the
// watch breaks, or roundTimeout passes.
func (w *watcher) wait(ctx context.Context, names []string, what string, done func(*vmState) bool) error {
	return w.waitFor(ctx, names, what, roundTimeout, done)
}

// waitFor is wait with a bound of its own.
func (w *watcher) waitFor(ctx context.Context, names []string, what string, timeout time.Duration, done func(*vmState) bool) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		w.mu.Lock()
		err, pending := w.err, 0
		for _, name := range names {
			st := w.vms[name]
			switch {
			case st != nil && done(st):
			case st != nil && st.failed != "" && what != "deleted":
				err = fmt.Errorf("VM %s went to ERROR while waiting for %s: %s", name, what, st.failed)
			default:
				pending++
			}
		}
		w.mu.Unlock()
		if err != nil {
			return err
		}
		if pending == 0 {
			return nil
		}
		select {
		case <-w.changed:
		case <-deadline.C:
			return fmt.Errorf("%d of %d VMs not %s within %v", pending, len(names), what, timeout)
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		}
	}
}
