package store

import (
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// EventOps returns the ops that append events to a VM's event log, all
// stamped now; seq keeps events of one write in order.
func EventOps(vmID string, now time.Time, events ...*minicloudv1.Event) ([]clientv3.Op, error) {
	ops := make([]clientv3.Op, 0, len(events))
	for i, ev := range events {
		// The writer's clock stamps every event, whatever time a reporter
		// (an agent) put in it: a report can neither backdate its events
		// nor aim their keys at another event's to overwrite it.
		ev.Time = timestamppb.New(now)
		op, err := PutOp(VMEventKey(vmID, ev.GetTime().AsTime().UnixNano(), i), ev)
		if err != nil {
			return nil, err
		}
		ops = append(ops, op)
	}
	return ops, nil
}
