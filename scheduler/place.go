package scheduler

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/placement"
	"github.com/minicloud/minicloud/scheduler/snapshot"
)

// Requeue delays. A busy group, or a host full only with this replica's
// uncommitted placements, is freed by this replica's own commit within a
// few milliseconds; a lost race is retried on the refreshed view straight
// away.
const (
	busyRequeue = 5 * time.Millisecond
	// catchUpTimeout bounds the wait for the view to catch up with etcd
	// before a NoValidHost decision.
	catchUpTimeout  = 2 * time.Second
	conflictRequeue = 20 * time.Millisecond
)

// vmState is a VM's spec and status. The status and its revision come from
// the status watch (a commit compares that revision, so a stale one only
// costs a failed commit that returns the fresh status); the spec from the
// spec watch, or a read if the watch has not delivered it.
type vmState struct {
	id        string
	vm        *minicloudv1.VM
	status    *minicloudv1.VMStatus
	statusRev int64
	// pendingSince: see vmEntry.
	pendingSince time.Time
}

// shareKey is what decides which replica owns a VM: its server group if it
// has one, so that one replica decides all members of a group one after
// the other (two first members of an affinity group decided at the same
// instant by two replicas could otherwise land apart), else the VM id.
func (v *vmState) shareKey() string {
	if g := v.vm.GetSpec().GetServerGroup(); g != "" {
		return "group/" + placement.GroupKey(v.vm.GetMeta().GetProject(), g)
	}
	return "vm/" + v.id
}

// specNotVisible is how long to wait before looking again at a VM whose
// status is known but whose spec this etcd member has not applied yet.
const specNotVisible = 50 * time.Millisecond

// readVM returns the VM, or nil if it is gone or not ready to be read (then
// after says when to look again).
func (s *Scheduler) readVM(ctx context.Context, id string) (v *vmState, after time.Duration, err error) {
	s.mu.Lock()
	e, ok := s.vms[id]
	spec := s.specs[id]
	s.mu.Unlock()
	if !ok {
		return nil, 0, nil // deleted
	}
	if e.status.GetPhase() != lifecycle.Pending {
		return nil, 0, nil
	}
	if spec != nil {
		return &vmState{id: id, vm: spec, status: e.status, statusRev: e.rev, pendingSince: e.pendingSince}, 0, nil
	}
	// Not (yet) delivered by the spec watch. Serializable: the spec was written with (or before) the status we
	// saw, so a local read suffices; a lagging member is retried below.
	vm := &minicloudv1.VM{}
	if _, err := store.Get(ctx, s.cli, store.VMSpecKey(id), vm, clientv3.WithSerializable()); errdefs.IsNotFound(err) {
		return nil, specNotVisible, nil
	} else if err != nil {
		return nil, 0, fmt.Errorf("read spec of vm %s: %w", id, err)
	}
	return &vmState{id: id, vm: vm, status: e.status, statusRev: e.rev, pendingSince: e.pendingSince}, 0, nil
}

// scheduleOne places one VM if it is PENDING.
func (s *Scheduler) scheduleOne(ctx context.Context, id string, rng *rand.Rand) (time.Duration, error) {
	v, after, err := s.readVM(ctx, id)
	if err != nil || v == nil {
		return after, err
	}
	if v.status.GetPhase() != lifecycle.Pending || v.vm.GetSpec().GetDeletionRequested() {
		return 0, nil
	}
	if !s.members.owns(v.shareKey()) {
		// Another replica's share: take it over only if it is still
		// PENDING after takeoverDelay (its owner died or is far behind).
		if wait := takeoverDelay - time.Since(v.pendingSince); wait > 0 {
			return wait, nil
		}
	}
	if n := v.status.GetScheduleAttempts(); int(n) >= s.cfg.MaxAttempts {
		return s.fail(ctx, v, lifecycle.ReasonMaxAttemptsExceeded, fmt.Sprintf(
			"placed %d times (max attempts %d) and failed on hosts %s", n, s.cfg.MaxAttempts, strings.Join(v.status.GetTriedHosts(), ", ")))
	}
	req, err := s.request(ctx, v)
	if err != nil {
		var nf *groupNotFoundError
		if errors.As(err, &nf) {
			return s.fail(ctx, v, lifecycle.ReasonServerGroupNotFound, err.Error())
		}
		return 0, err
	}

	caughtUp, solo := false, false
	for range maxCommitAttempts {
		r, err := s.snap.Reserve(req, s.cfg.Policy, rng)
		var nvh *placement.NoValidHostError
		switch {
		case errors.Is(err, snapshot.ErrGroupBusy):
			return busyRequeue, nil
		case errors.As(err, &nvh):
			if nvh.Retryable() {
				s.observe(Observation{VMID: id, Outcome: "retry", DecideTime: r.DecideTime})
				return busyRequeue, nil
			}
			if !caughtUp {
				// NoValidHost is final for the VM, so decide it only on a
				// view that holds everything etcd had when the VM was
				// last written: capacity released just before (a delete,
				// a reschedule) may still be on its way through the watch.
				caughtUp = true
				wctx, cancel := context.WithTimeout(ctx, catchUpTimeout)
				err := s.snap.WaitApplied(wctx, v.statusRev)
				cancel()
				if err != nil {
					if ctx.Err() != nil {
						return 0, ctx.Err()
					}
					s.log.Warn("scheduler: view behind etcd; deciding again later", "vm", id, "err", err)
					return conflictRequeue, nil
				}
				continue
			}
			s.observe(Observation{VMID: id, Outcome: "no-valid-host", DecideTime: r.DecideTime})
			return s.fail(ctx, v, lifecycle.ReasonNoValidHost, nvh.Error())
		case err != nil:
			return 0, err
		}
		seenRev := v.statusRev
		done, grouped, err := s.commit(ctx, v, r, solo)
		if err != nil || done {
			return 0, err
		}
		// A group is all or nothing: after losing in one, commit alone.
		solo = solo || grouped
		if v.statusRev != seenRev {
			// Someone else changed the VM: another replica placed it, or
			// the API deleted or rescheduled it.
			// Look at it afresh (attempts, tried hosts) if still PENDING.
			s.observe(Observation{VMID: id, Outcome: "vm-changed", DecideTime: r.DecideTime})
			if v.status.GetPhase() != lifecycle.Pending {
				return 0, nil
			}
			return busyRequeue, nil
		}
		s.observe(Observation{VMID: id, Outcome: "conflict", DecideTime: r.DecideTime})
	}
	return conflictRequeue, nil
}

type groupNotFoundError struct{ group string }

func (e *groupNotFoundError) Error() string {
	return fmt.Sprintf("server group %s does not exist", e.group)
}

// request builds the placement request of v.
func (s *Scheduler) request(ctx context.Context, v *vmState) (*placement.Request, error) {
	spec := v.vm.GetSpec()
	target := spec.GetTargetHost()
	if v.status.GetReason() == lifecycle.ReasonEvacuated {
		// Pinned to the host it was evacuated from: anywhere else will do.
		target = ""
	}
	req := &placement.Request{
		VMID:       v.id,
		Resources:  placement.ResourcesFromProto(spec.GetResources()),
		Zone:       spec.GetAvailabilityZone(),
		Hypervisor: spec.GetRequiredHypervisor(),
		TargetHost: target,
		TriedHosts: v.status.GetTriedHosts(),
	}
	if spec.GetServerGroup() == "" {
		return req, nil
	}
	project := v.vm.GetMeta().GetProject()
	req.Group = placement.GroupKey(project, spec.GetServerGroup())
	policy, ok := s.snap.Policy(req.Group)
	if !ok {
		// The watch may not have delivered a group created just before
		// the VM: ask etcd before calling it missing.
		sg := &minicloudv1.ServerGroup{}
		if _, err := store.Get(ctx, s.cli, store.ServerGroupKey(project, spec.GetServerGroup()), sg); errdefs.IsNotFound(err) {
			return nil, &groupNotFoundError{group: req.Group}
		} else if err != nil {
			return nil, fmt.Errorf("read server group %s: %w", req.Group, err)
		}
		policy = sg.GetPolicy()
	}
	req.Policy = policy
	return req, nil
}

// commit writes the claim, the host allocation, the SCHEDULED status and
// an event, in the host's group commit (lane.go; alone if solo). It
// returns done=false when it lost a race or the host had no room left at
// commit time; v and the snapshot then hold the fresh values to decide
// again on. grouped says the commit held other placements too. The
// reservation ends on every path.
func (s *Scheduler) commit(ctx context.Context, v *vmState, r snapshot.Reservation, solo bool) (done, grouped bool, err error) {
	if err := lifecycle.Check(v.status.GetPhase(), lifecycle.Scheduled, lifecycle.Scheduler); err != nil {
		s.snap.Abort(r)
		return false, false, fmt.Errorf("place vm %s: %w", v.id, err)
	}
	now := time.Now()
	claim := &minicloudv1.Claim{
		VmId: v.id, Host: r.Host, Resources: v.vm.GetSpec().GetResources(),
		Project: v.vm.GetMeta().GetProject(), ServerGroup: v.vm.GetSpec().GetServerGroup(),
		Time: timestamppb.New(now),
	}
	st := proto.CloneOf(v.status)
	st.Phase = lifecycle.Scheduled
	st.Host = r.Host
	st.HostDown = false
	st.ScheduleAttempts++
	// A new epoch for every placement: a host that still holds an older
	// copy (it was fenced and the VM evacuated) destroys it.
	st.AssignmentEpoch++
	st.Reason, st.Message = "", ""
	st.UpdateTime = timestamppb.New(now)
	msg := fmt.Sprintf("placed on host %s (attempt %d of %d, %d candidates ranked)", r.Host, st.ScheduleAttempts, s.cfg.MaxAttempts, r.Decision.Candidates)
	lifecycle.SetCondition(st, lifecycle.ConditionScheduled, true, lifecycle.ReasonScheduled, msg, now)
	res := s.lanes.place(ctx, r, store.Placement{
		Claim: claim, Status: st, StatusRev: v.statusRev,
		Event: s.event(lifecycle.EventNormal, lifecycle.ReasonScheduled, msg), Now: now,
	}, solo)
	if res.err != nil {
		return false, res.grouped, fmt.Errorf("commit claim of vm %s on host %s: %w", v.id, r.Host, res.err)
	}
	switch res.outcome {
	case placed:
		s.observe(Observation{VMID: v.id, Host: r.Host, Outcome: "scheduled", DecideTime: r.DecideTime})
		return true, res.grouped, nil
	case overflowed:
		return false, false, nil
	}
	if res.fresh.Status == nil {
		return true, res.grouped, nil // the VM is gone
	}
	v.status, v.statusRev = res.fresh.Status, res.fresh.Rev
	return false, res.grouped, nil
}

// event is an event of this replica.
func (s *Scheduler) event(kind, reason, msg string) *minicloudv1.Event {
	return &minicloudv1.Event{Type: kind, Reason: reason, Message: msg, Source: s.cfg.Source}
}

// fail moves a PENDING VM to ERROR with reason and msg, and records an
// event. If the status changed meanwhile the VM is looked at again.
func (s *Scheduler) fail(ctx context.Context, v *vmState, reason, msg string) (time.Duration, error) {
	if err := lifecycle.Check(v.status.GetPhase(), lifecycle.Error, lifecycle.Scheduler); err != nil {
		return 0, fmt.Errorf("record %s for vm %s: %w", reason, v.id, err)
	}
	now := time.Now()
	st := proto.CloneOf(v.status)
	st.Phase = lifecycle.Error
	st.Reason, st.Message = reason, msg
	st.UpdateTime = timestamppb.New(now)
	lifecycle.SetCondition(st, lifecycle.ConditionScheduled, false, reason, msg, now)
	txn, err := store.VMStatusTxn(v.id, v.statusRev, st, now, s.event(lifecycle.EventWarning, reason, msg))
	if err != nil {
		return 0, err
	}
	_, ok, err := txn.Commit(ctx, s.cli)
	if err != nil {
		return 0, fmt.Errorf("record %s for vm %s: %w", reason, v.id, err)
	}
	if !ok {
		return conflictRequeue, nil
	}
	s.log.Info("scheduler: vm not placed", "vm", v.id, "reason", reason, "message", msg)
	return 0, nil
}

// reconcileHostDown makes a VM's status.host_down match its host's
// liveness in the snapshot.
func (s *Scheduler) reconcileHostDown(ctx context.Context, id string, _ *rand.Rand) (time.Duration, error) {
	st := &minicloudv1.VMStatus{}
	rev, err := store.Get(ctx, s.cli, store.VMStatusKey(id), st)
	if errdefs.IsNotFound(err) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read status of vm %s: %w", id, err)
	}
	if st.GetHost() == "" {
		return 0, nil
	}
	down := !s.snap.Alive(st.GetHost())
	if st.GetHostDown() == down {
		return 0, nil
	}
	if err := lifecycle.Check(st.GetPhase(), st.GetPhase(), lifecycle.Scheduler); err != nil {
		return 0, fmt.Errorf("set host_down=%t on vm %s: %w", down, id, err)
	}
	now := time.Now()
	st.HostDown = down
	st.UpdateTime = timestamppb.New(now)
	ev := s.event(lifecycle.EventNormal, lifecycle.ReasonHostUp, fmt.Sprintf("host %s is up again", st.GetHost()))
	if down {
		ev = s.event(lifecycle.EventWarning, lifecycle.ReasonHostDown, fmt.Sprintf("host %s lost its heartbeat lease", st.GetHost()))
	}
	txn, err := store.VMStatusTxn(id, rev, st, now, ev)
	if err != nil {
		return 0, err
	}
	_, ok, err := txn.Commit(ctx, s.cli)
	if err != nil {
		return 0, fmt.Errorf("set host_down=%t on vm %s: %w", down, id, err)
	}
	if !ok {
		return conflictRequeue, nil
	}
	return 0, nil
}
