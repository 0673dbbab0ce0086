package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// waitTarget is the value of vm wait --for.
type waitTarget string

const (
	waitRunning waitTarget = "running"
	waitReady   waitTarget = "ready"
	waitDeleted waitTarget = "deleted"
	waitStopped waitTarget = "stopped"
)

func (t *waitTarget) String() string { return string(*t) }
func (t *waitTarget) Type() string   { return "running|ready|stopped|deleted" }
func (t *waitTarget) Set(s string) error {
	switch waitTarget(s) {
	case waitRunning, waitReady, waitStopped, waitDeleted:
		*t = waitTarget(s)
		return nil
	}
	return fmt.Errorf("%q: must be running, ready, stopped or deleted", s)
}

// conditionGuestReady is the condition "ready" waits for.
const conditionGuestReady = lifecycle.ConditionGuestReady

func guestReady(vm *minicloudv1.VM) bool {
	return lifecycle.ConditionTrue(vm.GetStatus(), conditionGuestReady)
}

func phaseOf(vm *minicloudv1.VM) string {
	return enumName(vm.GetStatus().GetPhase().String(), "VM_PHASE_")
}

// reached says whether vm is where target wants it, or that it never will
// get there.
func reached(vm *minicloudv1.VM, target waitTarget) (bool, error) {
	phase := vm.GetStatus().GetPhase()
	if target != waitDeleted {
		switch {
		case phase == minicloudv1.VMPhase_VM_PHASE_ERROR:
			msg := vm.GetStatus().GetMessage()
			if r := vm.GetStatus().GetReason(); r != "" {
				msg = r + ": " + msg
			}
			return false, fmt.Errorf("vm %s is in ERROR: %s (see 'minicloud vm events %s')", vm.GetMeta().GetName(), msg, vm.GetMeta().GetName())
		case phase == minicloudv1.VMPhase_VM_PHASE_DELETING || vm.GetSpec().GetDeletionRequested():
			return false, fmt.Errorf("vm %s is being deleted", vm.GetMeta().GetName())
		}
	}
	switch target {
	case waitRunning:
		return phase == minicloudv1.VMPhase_VM_PHASE_RUNNING, nil
	case waitReady:
		return guestReady(vm), nil
	case waitStopped:
		return phase == minicloudv1.VMPhase_VM_PHASE_STOPPED, nil
	}
	return false, nil
}

// waitVM follows vm through WatchVMs until it reaches target, printing each
// phase change on stderr. It watches from the revision vm was read at, so
// no change between that read and the watch is missed; if the stream
// breaks it resumes from the last revision it saw.
func (a *app) waitVM(ctx context.Context, c *client.Client, vm *minicloudv1.VM, target waitTarget, timeout time.Duration) (*minicloudv1.VM, error) {
	name, id, project := vm.GetMeta().GetName(), vm.GetMeta().GetId(), vm.GetMeta().GetProject()
	lastPhase, lastReady := "", false
	report := func(vm *minicloudv1.VM) {
		if p := phaseOf(vm); p != lastPhase {
			lastPhase = p
			fmt.Fprintf(a.errOut, "vm %s: %s\n", name, p)
		}
		if r := guestReady(vm); r && !lastReady {
			lastReady = true
			fmt.Fprintf(a.errOut, "vm %s: %s\n", name, conditionGuestReady)
		}
	}
	report(vm)
	if ok, err := reached(vm, target); ok || err != nil {
		return vm, err
	}
	rev := max(vm.GetMeta().GetResourceVersion(), vm.GetStatus().GetStatusVersion())
	backoff := 200 * time.Millisecond
	for {
		got, nextRev, done, err := a.watchOnce(ctx, c, id, project, rev, target, report)
		if err != nil && ctx.Err() != nil {
			return nil, a.interrupted(ctx, name, target, lastPhase, timeout)
		}
		if done || (err != nil && !errdefs.IsUnavailable(err) && !errdefs.IsConflict(err)) {
			return got, err
		}
		if errdefs.IsConflict(err) {
			// The revision is older than the server can replay (compacted,
			// or before the API server's watch history): start over from a
			// fresh read, and watch from 0 (the VM's state, then changes),
			// as the fresh read's revision may be just as old.
			fresh, gerr := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: id, Project: project})
			if errdefs.IsNotFound(gerr) && target == waitDeleted {
				return nil, nil
			}
			if gerr == nil {
				report(fresh)
				if ok, rerr := reached(fresh, target); ok || rerr != nil {
					return fresh, rerr
				}
			}
			nextRev = 0
		}
		if nextRev > rev {
			backoff = 200 * time.Millisecond // the stream made progress
		}
		rev = nextRev
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, a.interrupted(ctx, name, target, lastPhase, timeout)
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// watchOnce runs one WatchVMs stream. It returns done when the wait is
// over (successfully or not), else the revision to resume from.
func (a *app) watchOnce(ctx context.Context, c *client.Client, id, project string, rev int64, target waitTarget, report func(*minicloudv1.VM)) (*minicloudv1.VM, int64, bool, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.VMs.WatchVMs(ctx, &minicloudv1.WatchVMsRequest{Name: id, Project: project, ResourceVersion: rev})
	if err != nil {
		return nil, rev, false, err
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil, rev, true, ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				err = errdefs.Unavailable("watch ended")
			}
			return nil, rev, false, err
		}
		rev = max(rev, ev.GetResourceVersion())
		vm := ev.GetVm()
		if vm.GetMeta().GetId() != id && ev.GetType() != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK {
			continue
		}
		switch ev.GetType() {
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK:
			continue
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
			if target == waitDeleted {
				return vm, rev, true, nil
			}
			return nil, rev, true, fmt.Errorf("vm %s was deleted", vm.GetMeta().GetName())
		}
		report(vm)
		if ok, err := reached(vm, target); ok || err != nil {
			return vm, rev, true, err
		}
	}
}

// interrupted explains why a wait stopped early: its deadline, or the user
// (Ctrl-C).
func (a *app) interrupted(ctx context.Context, name string, target waitTarget, phase string, timeout time.Duration) error {
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("stopped waiting for vm %s to be %s: %w", name, target, ctx.Err())
	}
	return &timeoutError{msg: fmt.Sprintf("timed out after %s waiting for vm %s to be %s (phase %s)", timeout, name, target, phase)}
}
