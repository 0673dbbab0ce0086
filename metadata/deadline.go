package metadata

import (
	"sync"
	"sync/atomic"
	"time"
)

// deadlineSlack is how much later than asked a connection's deadline may
// act (see lazyDeadline).
const deadlineSlack = 500 * time.Millisecond

// lazyDeadline is one direction (read or write) of a connection's deadline,
// armed in the runtime only when an I/O call needs it.
//
// fasthttp asks for three deadlines per request: the idle wait's before it
// reads, the read timeout's once the first byte is there, the write
// timeout's before it writes. Each is a runtime timer change under the
// socket's poll-descriptor lock, 2–3 % of the service's CPU at saturation
// (docs/benchmarks.md). A deadline acts only on a read or write,
// so it is kept here and armed when the next one starts, and only if the
// one armed does not already fall within deadlineSlack after it; when armed,
// it is armed deadlineSlack late. So a deadline never acts earlier than
// asked and at most deadlineSlack later, a request that arrives whole in
// the read ending the idle wait (almost all do) never arms its read
// timeout, and the idle and write deadlines, asked anew for every request,
// are armed about twice a second per busy connection instead of every time.
// A deadline asked while an I/O call is in flight is armed at once, as
// net.Conn's contract requires.
type lazyDeadline struct {
	mu    sync.Mutex
	want  time.Time // asked for (zero: none)
	armed time.Time // what the runtime has (zero: none)
	// active counts I/O calls in flight. It rises under mu, before begin
	// arms, so a set either comes first (and begin arms what it asked) or
	// sees the call; it falls without mu, so a set just after a call ended
	// may arm at once, which is only early work.
	active atomic.Int32
}

// set asks for t; arm sets the socket's deadline.
func (d *lazyDeadline) set(t time.Time, arm func(time.Time) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.want = t
	if d.active.Load() > 0 {
		return d.armLocked(arm, 0)
	}
	return nil
}

// setNow arms exactly t at once: for a reader of the socket that does not
// go through the connection's Read (the long-poll's hang-up watch).
func (d *lazyDeadline) setNow(t time.Time, arm func(time.Time) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.want = t
	return d.armLocked(arm, 0)
}

// begin arms what was asked for, if the armed deadline does not cover it,
// before an I/O call; end must follow unless it fails (then the call must
// not be made).
func (d *lazyDeadline) begin(arm func(time.Time) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.active.Add(1)
	if err := d.armLocked(arm, deadlineSlack); err != nil {
		d.active.Add(-1)
		return err
	}
	return nil
}

func (d *lazyDeadline) end() { d.active.Add(-1) }

// armLocked arms want (slack later) unless the armed deadline is want or
// at most deadlineSlack after it.
func (d *lazyDeadline) armLocked(arm func(time.Time) error, slack time.Duration) error {
	switch {
	case d.want.Equal(d.armed):
		return nil
	case !d.want.IsZero() && !d.armed.IsZero() && !d.armed.Before(d.want) && d.armed.Sub(d.want) <= deadlineSlack:
		return nil
	}
	t := d.want
	if !t.IsZero() {
		t = t.Add(slack)
	}
	if err := arm(t); err != nil {
		return err // a closed socket: nothing more to arm
	}
	d.armed = t
	return nil
}
