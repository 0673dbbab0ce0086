package lifecycle

import (
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestEveryStatusFieldHasAnOwner: a new VMStatus field must be sorted into
// the host's fields or the others' here, on purpose.
func TestEveryStatusFieldHasAnOwner(t *testing.T) {
	notHosts := map[protoreflect.Name]bool{
		"host": true, "addresses": true, "schedule_attempts": true, "tried_hosts": true,
		"update_time": true, "status_version": true, "host_down": true, "assignment_epoch": true,
	}
	hosts := map[protoreflect.Name]bool{}
	for _, fd := range hostOwnedFields {
		hosts[fd.Name()] = true
	}
	fields := (&minicloudv1.VMStatus{}).ProtoReflect().Descriptor().Fields()
	for i := range fields.Len() {
		name := fields.Get(i).Name()
		if hosts[name] == notHosts[name] {
			t.Errorf("VMStatus.%s: host-owned %v, owned by others %v; want exactly one", name, hosts[name], notHosts[name])
		}
	}
}
