package lifecycle

import (
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// hostOwnedFields are the fields of VMStatus a host owns: what it observed
// of the VM. The API and the scheduler own the rest (host, addresses,
// schedule attempts, tried hosts, host_down, assignment epoch, update
// time). This is the one list of them: a report replaces exactly these,
// and a host compares exactly these to tell whether it has anything new
// to say.
var hostOwnedFields = func() []protoreflect.FieldDescriptor {
	fields := (&minicloudv1.VMStatus{}).ProtoReflect().Descriptor().Fields()
	var out []protoreflect.FieldDescriptor
	for _, name := range []protoreflect.Name{
		"phase", "conditions", "reason", "message", "hypervisor",
		"observed_reboot_generation", "observed_resource_version", "observed_metadata_version",
	} {
		fd := fields.ByName(name)
		if fd == nil {
			panic("lifecycle: VMStatus has no field " + string(name))
		}
		out = append(out, fd)
	}
	return out
}()

// copyHostOwned sets the host-owned fields of dst to deep copies of src's.
func copyHostOwned(dst, src *minicloudv1.VMStatus) {
	s, d := proto.CloneOf(src).ProtoReflect(), dst.ProtoReflect()
	for _, fd := range hostOwnedFields {
		if s.Has(fd) {
			d.Set(fd, s.Get(fd))
		} else {
			d.Clear(fd)
		}
	}
}

// MergeHostStatus copies the host-owned fields of observed into st (a
// deep copy: st shares nothing with observed afterwards). An unspecified
// phase in observed keeps st's phase.
func MergeHostStatus(st, observed *minicloudv1.VMStatus) {
	phase := st.GetPhase()
	copyHostOwned(st, observed)
	if observed.GetPhase() == None {
		st.Phase = phase
	}
}

// SameHostStatus reports whether a and b agree on every host-owned field,
// ignoring when conditions last changed (a host re-observing the same
// thing has nothing new to report).
func SameHostStatus(a, b *minicloudv1.VMStatus) bool {
	if a == nil || b == nil {
		return a == b
	}
	ha, hb := &minicloudv1.VMStatus{}, &minicloudv1.VMStatus{}
	copyHostOwned(ha, a)
	copyHostOwned(hb, b)
	for _, c := range ha.Conditions {
		c.LastTransitionTime = nil
	}
	for _, c := range hb.Conditions {
		c.LastTransitionTime = nil
	}
	return proto.Equal(ha, hb)
}

// SetCondition sets condition typ of st and reports whether its status
// flipped (an absent condition counts as false, so adding a true one is a
// flip). The transition time moves only when the status flips, as in
// Kubernetes; reason and message are always updated.
func SetCondition(st *minicloudv1.VMStatus, typ string, status bool, reason, message string, now time.Time) bool {
	for _, c := range st.Conditions {
		if c.Type != typ {
			continue
		}
		flipped := c.Status != status
		c.Status, c.Reason, c.Message = status, reason, message
		if flipped {
			c.LastTransitionTime = timestamppb.New(now)
		}
		return flipped
	}
	st.Conditions = append(st.Conditions, &minicloudv1.Condition{
		Type: typ, Status: status, Reason: reason, Message: message, LastTransitionTime: timestamppb.New(now),
	})
	return status
}

// ConditionTrue reports whether condition typ of st is present and true
// (an absent condition counts as false, as in SetCondition).
func ConditionTrue(st *minicloudv1.VMStatus, typ string) bool {
	for _, c := range st.GetConditions() {
		if c.GetType() == typ {
			return c.GetStatus()
		}
	}
	return false
}

// NewEvent returns an event of kind (EventNormal or EventWarning) at now.
func NewEvent(kind, reason, message string, now time.Time) *minicloudv1.Event {
	return &minicloudv1.Event{Time: timestamppb.New(now), Type: kind, Reason: reason, Message: message}
}
