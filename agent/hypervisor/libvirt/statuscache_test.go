package libvirt_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/hypervisor/libvirt"
)

// TestStatusIsKeptUntilLibvirtReportsAChange: a running domain's status is
// read from libvirtd once and then kept; a change behind the driver's back
// (virsh destroy) arrives as a lifecycle event, and the next Status asks
// libvirtd again and sees the domain stopped; the driver's own calls
// (Start) forget the kept status at once, without waiting for the event.
func TestStatusIsKeptUntilLibvirtReportsAChange(t *testing.T) {
	d := newDriver(t).(*libvirt.Driver)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	spec := newSpec(t, uuid.NewString())
	id := spec.VMID
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	t.Cleanup(func() { _ = d.Undefine(context.Background(), id) })
	if err := d.Start(ctx, id); err != nil {
		t.Fatalf("Start: %v", err)
	}
	// The start's own events, so none arrives between the reads below.
	waitFor(t, d, "started", func(ev hypervisor.Event) bool { return ev.VMID == id && ev.Kind == hypervisor.EventStarted })

	status := func(wantRunning bool) {
		t.Helper()
		st, err := d.Status(ctx, id)
		if err != nil || !st.Exists || st.Running != wantRunning {
			t.Fatalf("Status: %+v, %v; want running %v", st, err, wantRunning)
		}
	}
	status(true)
	reads := libvirt.StatusReads(d)
	status(true)
	status(true)
	if got := libvirt.StatusReads(d) - reads; got != 0 {
		t.Fatalf("an unchanged domain: %d more reads from libvirtd, want 0", got)
	}

	if out, err := virsh("destroy", hypervisor.DomainName(id)); err != nil {
		t.Fatalf("virsh destroy: %v: %s", err, out)
	}
	waitFor(t, d, "stopped", func(ev hypervisor.Event) bool { return ev.VMID == id && ev.Kind == hypervisor.EventStopped })
	status(false)
	if got := libvirt.StatusReads(d) - reads; got != 1 {
		t.Fatalf("after the domain's stop event: %d reads from libvirtd, want 1", got)
	}

	if err := d.Start(ctx, id); err != nil {
		t.Fatalf("Start again: %v", err)
	}
	status(true)
}
