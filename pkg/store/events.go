package store

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// MaxVMEvents is how many events a VM's log keeps: an append that goes
// past it drops the oldest in the same transaction, so no reporter (an
// agent in a loop, many replicas at once) can grow etcd without bound.
// ListVMEvents says how many were dropped.
const MaxVMEvents = 256

// A VM's event log is vms/events/<id>/<seq>, seq 0, 1, 2... in the order of
// the appends, and vms/eventseq/<id>, the number of events ever appended
// (the next seq). Every append compares that counter unchanged since it
// was read, so two appends never take the same seq (none overwrites
// another's event) and the trim below is exact under concurrent writers:
// one of two racing appends commits, the other fails its compare and its
// caller retries on fresh reads, as for any other lost race.

// EventAppend is events to append to one VM's log when the transaction
// that carries it (Txn.Events) commits. The write protocols add it; Commit
// reads the log's counter and turns it into its compare and writes.
type EventAppend struct {
	VMID   string
	Now    time.Time
	Events []*minicloudv1.Event
	// New says the VM is created in this transaction: its log is known
	// empty (its counter must be absent), so nothing is read.
	New bool
	// Log, if set, is the log's state as the writer read it together with
	// the VM (GetVMAndEventLog): Commit does not read it again. A stale
	// one fails the compare on the counter, as any stale read does.
	Log *EventLog
}

// KnownEventLog records that log is the state of vmID's event log as read
// with what t compares (see EventAppend.Log).
func (t *Txn) KnownEventLog(vmID string, log EventLog) {
	for i := range t.Events {
		if t.Events[i].VMID == vmID && !t.Events[i].New {
			t.Events[i].Log = &log
		}
	}
}

// AppendEvents adds events to vmID's log when t commits, all stamped now.
func (t *Txn) AppendEvents(vmID string, now time.Time, events ...*minicloudv1.Event) {
	if len(events) == 0 {
		return
	}
	t.Events = append(t.Events, EventAppend{VMID: vmID, Now: now, Events: events})
}

// EventLog is the state of a VM's event log: the counter and its mod
// revision (0: absent, nothing ever appended).
type EventLog struct {
	Appended, ModRevision int64
}

// Dropped is how many events the log no longer holds, of Appended, when
// it holds kept.
func (l EventLog) Dropped(kept int) int64 {
	return max(0, l.Appended-int64(kept))
}

// ParseEventLog decodes the counter key (nil: absent).
func ParseEventLog(v []byte, modRev int64) (EventLog, error) {
	if v == nil {
		return EventLog{}, nil
	}
	n, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil || n < 0 {
		return EventLog{}, fmt.Errorf("event counter %q is not a count", v)
	}
	return EventLog{Appended: n, ModRevision: modRev}, nil
}

// eventLogOps returns the compare and writes of appending events to a log
// in state log: the events at the next seqs, the counter moved past them,
// and the events that fall out of the last MaxVMEvents deleted.
func eventLogOps(id string, log EventLog, events []*minicloudv1.Event) (clientv3.Cmp, []clientv3.Op, error) {
	// A write that carries more than the log keeps (none does: a report
	// has at most 64) stores only its newest; the rest count as dropped.
	next := log.Appended + int64(len(events))
	ops := make([]clientv3.Op, 0, min(len(events), MaxVMEvents)+2)
	for i, ev := range events {
		seq := log.Appended + int64(i)
		if seq < next-MaxVMEvents {
			continue
		}
		op, err := PutOp(VMEventKey(id, seq), ev)
		if err != nil {
			return clientv3.Cmp{}, nil, err
		}
		ops = append(ops, op)
	}
	if floor := next - MaxVMEvents; floor > 0 {
		// Every seq below floor: never one just put (etcd refuses a
		// transaction whose delete covers one of its puts).
		ops = append(ops, clientv3.OpDelete(VMEventsPrefix(id), clientv3.WithRange(VMEventKey(id, floor))))
	}
	ops = append(ops, clientv3.OpPut(VMEventSeqKey(id), strconv.FormatInt(next, 10)))
	return Unchanged(VMEventSeqKey(id), log.ModRevision), ops, nil
}

// resolveEvents folds the event appends of txns into their compares and
// writes, reading the counters of every log they append to in one round
// trip. Appends to one VM within a transaction are merged in order; two
// transactions (nested in one commit) must not append to the same VM, as
// they must not write the same key.
func resolveEvents(ctx context.Context, kv clientv3.KV, txns []Txn) ([]Txn, error) {
	type pending struct {
		txn   int
		isNew bool
		evs   []*minicloudv1.Event
		read  Read
		known *EventLog // the state the writer read (EventAppend.Log)
	}
	appends := 0
	for _, t := range txns {
		appends += len(t.Events)
	}
	if appends == 0 {
		return txns, nil
	}
	// Sized once: a group commit's transaction appends to 32 new logs.
	// pendings never grows past appends, so pointers into it stay valid.
	logs := make(map[string]*pending, appends)
	pendings := make([]pending, 0, appends)
	order := make([]string, 0, appends)
	var reads Reads
	// grow[i]: how many compares and writes the logs add to txns[i] (at
	// most), so its copy below is allocated once at its full size.
	type growth struct{ cmps, ops int }
	grow := make([]growth, len(txns))
	for i, t := range txns {
		for _, a := range t.Events {
			p := logs[a.VMID]
			if p == nil {
				pendings = append(pendings, pending{txn: i, isNew: a.New, known: a.Log})
				p = &pendings[len(pendings)-1]
				logs[a.VMID] = p
				order = append(order, a.VMID)
				if !a.New && a.Log == nil {
					p.read = reads.Get(VMEventSeqKey(a.VMID))
				}
				grow[i].cmps++
				grow[i].ops += 2 // the counter, and a delete of the oldest
			} else if p.txn != i {
				return nil, fmt.Errorf("two transactions of one commit append events to vm %s", a.VMID)
			}
			grow[i].ops += len(a.Events)
			for _, ev := range a.Events {
				// The writer's clock stamps every event, whatever time a
				// reporter (an agent) put in it: a report cannot backdate
				// its events, and the counter's compare keeps it from
				// aiming at another's key.
				ev.Time = timestamppb.New(a.Now)
			}
			if p.evs == nil {
				// The caller's list itself, clipped so that a later append
				// to this log copies it rather than write past its end.
				p.evs = slices.Clip(a.Events)
			} else {
				p.evs = append(p.evs, a.Events...)
			}
		}
	}
	if len(reads.ops) > 0 {
		if err := reads.Do(ctx, kv); err != nil {
			return nil, err
		}
	}
	out := make([]Txn, len(txns))
	// copied[i]: out[i]'s compares and writes are this call's own copies,
	// appended to in place. Copying them once per transaction, not once
	// per log, matters for a group commit of 32 creates (createbatch.go):
	// copying a growing slice per VM allocated ~27 KB per create.
	copied := make([]bool, len(txns))
	for i, t := range txns {
		out[i] = Txn{If: t.If, Then: t.Then, Else: t.Else}
	}
	for _, id := range order {
		p := logs[id]
		var log EventLog
		switch {
		case p.isNew:
		case p.known != nil:
			log = *p.known
		default:
			var err error
			if kv := p.read.First(); kv != nil {
				log, err = ParseEventLog(kv.Value, kv.ModRevision)
			}
			if err != nil {
				return nil, fmt.Errorf("vm %s: %w", id, err)
			}
		}
		cmp, ops, err := eventLogOps(id, log, p.evs)
		if err != nil {
			return nil, err
		}
		t := &out[p.txn]
		if !copied[p.txn] {
			// The caller's slices are never appended to: they may be
			// shared with its retry.
			t.If = append(make([]clientv3.Cmp, 0, len(t.If)+grow[p.txn].cmps), t.If...)
			t.Then = append(make([]clientv3.Op, 0, len(t.Then)+grow[p.txn].ops), t.Then...)
			copied[p.txn] = true
		}
		t.If = append(t.If, cmp)
		t.Then = append(t.Then, ops...)
	}
	return out, nil
}

// ReadEventLog reads a VM's events, oldest first, and its log's counter,
// in one snapshot.
func ReadEventLog(ctx context.Context, kv clientv3.KV, vmID string) ([]*minicloudv1.Event, EventLog, error) {
	var reads Reads
	evs, seq := reads.Get(VMEventsPrefix(vmID), clientv3.WithPrefix()), reads.Get(VMEventSeqKey(vmID))
	if err := reads.Do(ctx, kv); err != nil {
		return nil, EventLog{}, err
	}
	var log EventLog
	if kv := seq.First(); kv != nil {
		var err error
		if log, err = ParseEventLog(kv.Value, kv.ModRevision); err != nil {
			return nil, EventLog{}, fmt.Errorf("vm %s: %w", vmID, err)
		}
	}
	out := make([]*minicloudv1.Event, 0, len(evs.KVs()))
	for _, kv := range evs.KVs() {
		ev := &minicloudv1.Event{}
		if err := Decode(kv, ev); err != nil {
			return nil, EventLog{}, err
		}
		out = append(out, ev)
	}
	return out, log, nil
}
