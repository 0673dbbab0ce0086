package scheduler

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/snapshot"
)

// fencePeriod is how often the scheduler looks at hosts without a lease.
const fencePeriod = time.Second

// fenceLoop handles hosts that lost their lease: it records when each was
// first seen so (hosts/down/), counts one as FENCED once its self-fencing
// deadline passed (store.FenceDeadline; only for a host whose agent
// self-fences), and then evacuates the VMs of a fenced host that asked
// for it (on_host_failure=EVACUATE) and finishes the deletes its host can
// no longer confirm. Every write compares that the host is still out of
// contact, so replicas may all run it and a host that comes back wins.
func (s *Scheduler) fenceLoop(ctx context.Context) {
	t := time.NewTicker(fencePeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, h := range s.snap.Down() {
			if err := s.handleDownHost(ctx, h, time.Now()); err != nil && ctx.Err() == nil {
				s.log.Warn("scheduler: host failure handling failed; will retry", "host", h.Name, "err", err)
			}
		}
	}
}

func (s *Scheduler) handleDownHost(ctx context.Context, h snapshot.DownHost, now time.Time) error {
	st, err := store.ReadHostFailureState(ctx, s.cli, h.Name)
	if err != nil {
		return err
	}
	switch {
	case !st.Registered || st.Alive:
		return nil // the view is behind etcd
	case st.DownSince == nil:
		txn, err := store.MarkHostDownTxn(h.Name, now)
		if err != nil {
			return err
		}
		if _, _, err := txn.Commit(ctx, s.cli); err != nil {
			return fmt.Errorf("record host %s unreachable: %w", h.Name, err)
		}
		s.log.Warn("scheduler: host unreachable", "host", h.Name, "fence_after", h.FenceAfter)
		return nil
	case st.Fence == nil:
		if h.FenceAfter <= 0 {
			return nil // only an operator can fence it
		}
		deadline := store.FenceDeadline(st.DownSince.AsTime(), h.FenceAfter)
		if now.Before(deadline) {
			return nil
		}
		txn, err := store.FenceHostTxn(h.Name, &minicloudv1.HostFence{
			Time: timestamppb.New(now), By: "timeout",
			Reason: fmt.Sprintf("no contact since %s (lease expired), and its agent destroys its domains after %s without contact", st.DownSince.AsTime().UTC().Format(time.RFC3339), h.FenceAfter),
		})
		if err != nil {
			return err
		}
		_, ok, err := txn.Commit(ctx, s.cli)
		if err != nil {
			return fmt.Errorf("fence host %s: %w", h.Name, err)
		}
		if ok {
			s.log.Warn("scheduler: host fenced (self-fencing deadline passed)", "host", h.Name, "down_since", st.DownSince.AsTime())
		}
		return nil
	}
	return s.recoverFencedHost(ctx, h.Name, now)
}

// recoverFencedHost evacuates the VMs of a fenced host that asked for it
// and removes those being deleted.
func (s *Scheduler) recoverFencedHost(ctx context.Context, host string, now time.Time) error {
	s.mu.Lock()
	ids := make([]string, 0, len(s.on[host]))
	for id := range s.on[host] {
		ids = append(ids, id)
	}
	s.mu.Unlock()
	// One read per 64 VMs, not one per VM: this runs every second on
	// every replica for as long as the host stays fenced.
	vms, err := store.GetVMs(ctx, s.cli, ids, 0)
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if vm == nil {
			continue // deleted since
		}
		id := vm.GetMeta().GetId()
		if vm.GetStatus().GetHost() != host {
			continue
		}
		var txn store.Txn
		switch {
		case vm.GetSpec().GetDeletionRequested():
			if err := lifecycle.Check(vm.GetStatus().GetPhase(), lifecycle.None, lifecycle.Scheduler); err != nil {
				return fmt.Errorf("finish delete of vm %s: %w", id, err)
			}
			txn, err = store.ForceRemoveVMTxn(ctx, s.cli, vm, true)
		case vm.GetSpec().GetOnHostFailure() == minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE:
			txn, err = store.EvacuateVMTxn(ctx, s.cli, vm, lifecycle.Scheduler, s.cfg.Source, now)
		default:
			continue // STOP: an operator decides
		}
		if err != nil {
			return err
		}
		_, ok, err := txn.Commit(ctx, s.cli)
		if err != nil {
			return fmt.Errorf("recover vm %s from fenced host %s: %w", id, host, err)
		}
		if ok {
			s.log.Warn("scheduler: vm recovered from fenced host", "vm", id, "host", host, "deleted", vm.GetSpec().GetDeletionRequested())
		}
		// Not ok: the VM or the host changed; the next pass looks again.
	}
	return nil
}
