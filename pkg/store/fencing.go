package store

import (
	"context"
	"fmt"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// Host failure: the keys and write protocols of fencing and evacuation.
//
// A host whose lease expired is UNREACHABLE: hosts/down/<name> records
// when the control plane first saw it so (the scheduler writes it, once).
// It is FENCED once hosts/fenced/<name> exists: an operator said the host
// runs none of its VMs (FenceHost), or the self-fencing deadline passed
// (FenceDeadline). Only then may its VMs leave it: an evacuation or a
// forced delete releases the VM's claim and records hosts/released/<host>/
// <vm id>, which the host is sent when it comes back (before its BOOKMARK)
// so it destroys what it still holds; it confirms, and the record goes.
// Every one of these transactions compares that the host's lease key is
// still absent, so a host that came back in between keeps its VMs.

// FenceMargin is added to a host's self-fencing delay before the control
// plane counts it as fenced by time: the agent's fence loop period, the
// time to destroy its domains, and the latency of its last renewal.
const FenceMargin = 5 * time.Second

// FenceDeadline is when a host first seen unreachable at downSince, whose
// agent self-fences after fenceAfter without a renewal, is proved to run
// nothing: the lease had already expired at downSince (TTL after the last
// renewal), and fenceAfter is shorter than the TTL, so the agent (if it is
// alive) destroyed its domains by downSince; fenceAfter again plus
// FenceMargin covers clocks, the loop period and slow destroys.
func FenceDeadline(downSince time.Time, fenceAfter time.Duration) time.Time {
	return downSince.Add(fenceAfter + FenceMargin)
}

// HostFailureState is what the control plane knows of a host's failure,
// read in one snapshot.
type HostFailureState struct {
	Name string
	// Registered: hosts/spec/<name> exists.
	Registered bool
	// Alive: the lease key exists (the host is UP).
	Alive bool
	// DownSince is when the host was first seen unreachable (nil: not
	// recorded).
	DownSince *timestamppb.Timestamp
	// Fence is set when the host is FENCED.
	Fence *minicloudv1.HostFence
}

// ReadHostFailureState reads a host's spec (existence), lease, down and
// fence keys.
func ReadHostFailureState(ctx context.Context, kv clientv3.KV, name string) (HostFailureState, error) {
	s := HostFailureState{Name: name}
	var reads Reads
	spec := reads.Get(HostSpecKey(name), clientv3.WithCountOnly())
	alive := reads.Get(HostAliveKey(name), clientv3.WithCountOnly())
	down, fenced := reads.Get(HostDownKey(name)), reads.Get(HostFencedKey(name))
	if err := reads.Do(ctx, kv); err != nil {
		return s, fmt.Errorf("read failure state of host %s: %w", name, err)
	}
	s.Registered, s.Alive = spec.Count() > 0, alive.Count() > 0
	if kv := down.First(); kv != nil {
		s.DownSince = &timestamppb.Timestamp{}
		if err := Decode(kv, s.DownSince); err != nil {
			return s, err
		}
	}
	if kv := fenced.First(); kv != nil {
		s.Fence = &minicloudv1.HostFence{}
		if err := Decode(kv, s.Fence); err != nil {
			return s, err
		}
	}
	return s, nil
}

// MarkHostDownTxn records that host was first seen unreachable at now, if
// its lease is still gone and nothing is recorded yet.
func MarkHostDownTxn(host string, now time.Time) (Txn, error) {
	op, err := PutOp(HostDownKey(host), timestamppb.New(now))
	if err != nil {
		return Txn{}, err
	}
	return Txn{
		If:   []clientv3.Cmp{Exists(HostSpecKey(host)), Absent(HostAliveKey(host)), Absent(HostDownKey(host))},
		Then: []clientv3.Op{op},
	}, nil
}

// FenceHostTxn records fence for host, if its lease is still gone and it
// is not fenced yet (the first fence is kept).
func FenceHostTxn(host string, fence *minicloudv1.HostFence) (Txn, error) {
	op, err := PutOp(HostFencedKey(host), fence)
	if err != nil {
		return Txn{}, err
	}
	return Txn{
		If:   []clientv3.Cmp{Exists(HostSpecKey(host)), Absent(HostAliveKey(host)), Absent(HostFencedKey(host))},
		Then: []clientv3.Op{op},
	}, nil
}

// HostUpOps are the ops of a host's return (a heartbeat that attaches a
// new lease): its liveness key under lease, and it is no longer
// unreachable nor fenced, in one transaction so that no evacuation can slip
// in between (they all compare that the liveness key is absent). The put
// also lets watchers that wait for a revision see the deletions: they look
// for the newest write under hosts/, and a delete leaves none.
// Released records stay until the host confirms it destroyed those VMs.
func HostUpOps(host string, lease clientv3.LeaseID) []clientv3.Op {
	return []clientv3.Op{
		clientv3.OpPut(HostAliveKey(host), strconv.FormatInt(int64(lease), 10), clientv3.WithLease(lease)),
		clientv3.OpDelete(HostDownKey(host)),
		clientv3.OpDelete(HostFencedKey(host)),
	}
}

// fencedCmps hold while host is fenced and out of contact.
func fencedCmps(host string) []clientv3.Cmp {
	return []clientv3.Cmp{Exists(HostFencedKey(host)), Absent(HostAliveKey(host))}
}

// releasedOp records that vm left host while the host was fenced.
func releasedOp(host string, vm *minicloudv1.VM) clientv3.Op {
	return clientv3.OpPut(HostReleasedKey(host, vm.GetMeta().GetId()), strconv.FormatInt(vm.GetStatus().GetAssignmentEpoch(), 10))
}

// EvacuateVMTxn moves vm off its fenced host: its claim there is released,
// the host is told (a release record), and the VM goes back to PENDING
// for the scheduler with the same id, name, addresses and user-data. Its
// disk on the fenced host is lost: the new host builds one from the image.
func EvacuateVMTxn(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM, by lifecycle.Actor, source string, now time.Time) (Txn, error) {
	host := vm.GetStatus().GetHost()
	if host == "" {
		return Txn{}, fmt.Errorf("evacuate vm %s: it is on no host", vm.GetMeta().GetName())
	}
	if err := lifecycle.Check(vm.GetStatus().GetPhase(), lifecycle.Pending, by); err != nil {
		return Txn{}, fmt.Errorf("evacuate vm %s: %w", vm.GetMeta().GetName(), err)
	}
	next := proto.CloneOf(vm.GetStatus())
	next.Phase = lifecycle.Pending
	next.Host = ""
	next.HostDown = false
	next.TriedHosts = []string{host}
	next.ScheduleAttempts = 0
	next.Conditions = nil
	next.Hypervisor = ""
	next.ObservedResourceVersion, next.ObservedRebootGeneration, next.ObservedMetadataVersion = 0, 0, 0
	next.Reason = lifecycle.ReasonEvacuated
	next.Message = fmt.Sprintf("evacuated from fenced host %s; rebuilding from image %s", host, vm.GetSpec().GetImage())
	next.UpdateTime = timestamppb.New(now)
	ev := &minicloudv1.Event{
		Type: lifecycle.EventWarning, Reason: lifecycle.ReasonEvacuated, Source: source,
		Message: fmt.Sprintf("host %s is fenced: the VM is rebuilt on another host from image %s with the same addresses and user-data; its local disk on %s is lost", host, vm.GetSpec().GetImage(), host),
	}
	t, err := RescheduleVMTxn(ctx, kv, vm, next, now, ev)
	if err != nil {
		return Txn{}, err
	}
	t.If = append(t.If, fencedCmps(host)...)
	t.Then = append(t.Then, releasedOp(host, vm))
	return t, nil
}

// ForceRemoveVMTxn removes vm for good without its host (RemoveVMTxn),
// which must be fenced or deregistered; a fenced host gets a release
// record, so it destroys what it still holds when it comes back.
func ForceRemoveVMTxn(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM, hostRegistered bool) (Txn, error) {
	t, err := RemoveVMTxn(ctx, kv, vm)
	if err != nil {
		return Txn{}, err
	}
	host := vm.GetStatus().GetHost()
	if host == "" {
		return t, nil
	}
	if !hostRegistered {
		t.If = append(t.If, Absent(HostSpecKey(host)))
		return t, nil
	}
	t.If = append(t.If, fencedCmps(host)...)
	t.Then = append(t.Then, releasedOp(host, vm))
	return t, nil
}

// ListReleased returns the ids of the VMs released from host and not yet
// confirmed gone by it.
func ListReleased(ctx context.Context, kv clientv3.KV, host string, rev int64) ([]string, error) {
	opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithKeysOnly()}
	if rev > 0 {
		opts = append(opts, clientv3.WithRev(rev))
	}
	resp, err := kv.Get(ctx, HostReleasedPrefix(host), opts...)
	if err != nil {
		return nil, fmt.Errorf("list VMs released from host %s: %w", host, err)
	}
	ids := make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		ids = append(ids, LastSegment(string(kv.Key)))
	}
	return ids, nil
}

// VMIDsOnHost returns the ids of the VMs holding a capacity claim on host
// (every VM placed there and not yet released), and the read's revision.
func VMIDsOnHost(ctx context.Context, kv clientv3.KV, host string) ([]string, int64, error) {
	resp, err := kv.Get(ctx, ClaimsPrefix(host), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, 0, fmt.Errorf("list VMs on host %s: %w", host, err)
	}
	ids := make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		ids = append(ids, LastSegment(string(kv.Key)))
	}
	return ids, resp.Header.Revision, nil
}

// DeleteHostTxn removes every key of a host that holds no VM (no claim
// written since rev, when the caller saw none) and is not UP. The caller
// revokes its certificates.
func DeleteHostTxn(host string, claimsRev int64) Txn {
	return Txn{
		If: []clientv3.Cmp{
			Exists(HostSpecKey(host)), Absent(HostAliveKey(host)),
			UnchangedSince(ClaimsPrefix(host), claimsRev),
		},
		Then: []clientv3.Op{
			clientv3.OpDelete(HostSpecKey(host)),
			clientv3.OpDelete(HostAllocKey(host)),
			clientv3.OpDelete(HostDownKey(host)),
			clientv3.OpDelete(HostFencedKey(host)),
			clientv3.OpDelete(HostReleasedPrefix(host), clientv3.WithPrefix()),
			clientv3.OpDelete(ClaimsPrefix(host), clientv3.WithPrefix()),
		},
	}
}
