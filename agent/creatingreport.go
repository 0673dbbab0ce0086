package agent

import (
	"context"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// defaultCreatingReportDelay is how long a create may run before its host
// reports CREATING on its own. A create that ends sooner (its image cached,
// libvirt not slowed down: about a second under TCG, less under KVM) sends
// its CREATING event with its final report instead: SCHEDULED → RUNNING in
// one etcd commit. A separate CREATING report was one more transaction per
// create in the API and etcd, beside the disk and network steps, and its
// echo on the assignment stream one more reconcile pass of the VM
// (hack/agentbench, "agent pickup"). A slower create (an image download,
// ten creates at once on a loaded libvirt) still shows CREATING after the
// delay, while the host works on it.
const defaultCreatingReportDelay = 2 * time.Second

// creatingReport is the CREATING report of one create pass, held back
// until the pass either ends well (fold: its event joins the final report)
// or has taken creatingReportDelay (sent on its own, as the pass goes on).
// A pass that fails sends it before it returns (flush), so a create the
// host keeps retrying shows CREATING, as it always did. Nothing of it is
// kept across passes: until a report reaches the API the VM is SCHEDULED
// there, and the next pass (after a restart, say) starts the create over,
// its CREATING included.
type creatingReport struct {
	a     *Agent
	vm    *minicloudv1.VM
	st    *minicloudv1.VMStatus // phase CREATING
	event *minicloudv1.Event

	mu    sync.Mutex
	state creatingState
	timer *time.Timer
	done  chan struct{} // closed once a sent report returned
	err   error         // of the sent report, once done
}

type creatingState int

const (
	creatingHeld    creatingState = iota
	creatingSent                  // sending or sent on its own
	creatingSettled               // fold took it: the final report carries its event, or the pass its error
)

// holdCreating holds back the CREATING report st (a copy is kept) of vm,
// and sends it on its own after a.creatingReportDelay unless the pass
// folds it first.
func (a *Agent) holdCreating(ctx context.Context, vm *minicloudv1.VM, st *minicloudv1.VMStatus, event *minicloudv1.Event) *creatingReport {
	c := &creatingReport{a: a, vm: vm, st: proto.CloneOf(st), event: event, done: make(chan struct{})}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.timer = time.AfterFunc(a.creatingReportDelay, func() { c.send(ctx) })
	return c
}

// send sends the report unless it was sent or folded already.
func (c *creatingReport) send(ctx context.Context) {
	c.mu.Lock()
	if c.state != creatingHeld {
		c.mu.Unlock()
		return
	}
	c.state = creatingSent
	c.mu.Unlock()
	c.err = c.a.report(ctx, c.vm, c.st, reportStatus, c.event)
	close(c.done)
}

// fold is called just before the pass's final report. While the report is
// still held it returns its event, to be sent first in the final report;
// once sent, it waits for that report (so the final one never overtakes
// it) and returns no event, or the report's error.
func (c *creatingReport) fold() (*minicloudv1.Event, error) {
	c.mu.Lock()
	switch c.state {
	case creatingHeld:
		c.state = creatingSettled
		c.timer.Stop()
		c.mu.Unlock()
		return c.event, nil
	case creatingSettled:
		c.mu.Unlock()
		return nil, nil
	}
	c.mu.Unlock()
	return nil, c.wait()
}

// flush sends the report now if it is still held, and waits for it: a pass
// that ends without its final report calls it on the way out, and one that
// reports something else first (a refused network) before that report.
// Once the report is settled, it does nothing.
func (c *creatingReport) flush(ctx context.Context) error {
	c.timer.Stop()
	c.send(ctx)
	c.mu.Lock()
	settled := c.state == creatingSettled
	c.mu.Unlock()
	if settled {
		return nil
	}
	return c.wait()
}

// wait waits for the sent report and settles it: its error is returned
// once, to the first caller.
func (c *creatingReport) wait() error {
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == creatingSettled {
		return nil
	}
	c.state = creatingSettled
	return c.err
}
