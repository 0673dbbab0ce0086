package agent

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// DensityRig is an agent over the fake hypervisor, network and API with the
// guest services given, for the external density benchmark
// (density_bench_test.go), which needs the real guest services and so
// cannot live in this package (they import it).
type DensityRig struct{ h *harness }

// NewDensityRig returns an agent synced with an empty assignment set.
func NewDensityRig(tb testing.TB, guest GuestServices) *DensityRig {
	tb.Helper()
	return &DensityRig{h: newHarnessWith(tb, guest)}
}

// densityBridge is the one network of the rig's VMs: a /16, so 1,000 VMs
// fit with an address each.
const densityBridge = "mc-0d0e0f10"

// AddRunningVM assigns VM number i (its own name, address and MAC) and
// reconciles it to RUNNING; it returns the VM's id.
func (r *DensityRig) AddRunningVM(i int) string {
	r.h.t.Helper()
	id := r.h.assign(minicloudv1.PowerState_POWER_STATE_RUNNING)
	r.h.a.mu.Lock()
	vm := r.h.a.assigned[id].vm
	vm.Meta.Name = fmt.Sprintf("vm-%04d", i)
	vm.Status.Addresses = []*minicloudv1.VMAddress{{Network: "density", Bridge: densityBridge,
		Ip: fmt.Sprintf("10.89.%d.%d", (i+2)/256, (i+2)%256), PrefixLength: 16, Gateway: "10.89.0.1",
		Mac: fmt.Sprintf("52:54:00:%02x:%02x:%02x", i>>16&0xff, i>>8&0xff, i&0xff)}}
	r.h.a.mu.Unlock()
	r.h.mustPass(id)
	if got := r.h.vm(id).GetStatus().GetPhase(); got != minicloudv1.VMPhase_VM_PHASE_RUNNING {
		r.h.t.Fatalf("VM %d: phase %s after its first pass, want RUNNING", i, got)
	}
	return id
}

// Reconcile runs one reconcile pass of id, as a worker does.
func (r *DensityRig) Reconcile(id string) error {
	_, err := r.h.pass(id)
	return err
}

// WriteSpec is a user's spec write (a new tag) arriving on the assignment
// stream: a new resource version of id.
func (r *DensityRig) WriteSpec(id string) {
	r.h.updateSpec(id, func(s *minicloudv1.VMSpec) {
		s.Tags = []string{fmt.Sprintf("written-%d", len(s.GetTags()))}
	})
}

// Publish runs the agent's publishGuests, as an assignment event does.
func (r *DensityRig) Publish() { r.h.a.publishGuests(context.Background()) }

// OnThisThread runs fn locked to the calling goroutine's thread and
// returns the thread's CPU time over it (passcpu.go): the CPU column of
// the density benchmark.
func OnThisThread(fn func()) time.Duration { return onThisThread(fn) }

// VM returns the agent's copy of id.
func (r *DensityRig) VM(id string) *minicloudv1.VM { return proto.Clone(r.h.vm(id)).(*minicloudv1.VM) }
