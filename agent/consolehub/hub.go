// Package consolehub shares a VM's serial console among the sessions
// attached to it. The hypervisor hands out one console stream per domain
// (libvirt refuses a second virDomainOpenConsole unless it is forced, which
// steals the stream), so the agent holds one stream per VM and fans it
// out: every session reads all output, one session at a time writes, and a
// session that attaches while the stream is open first gets the recent
// output (a bounded replay buffer). The stream is opened by the first
// session and closed when the last one leaves or the VM stops.
package consolehub

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Opener opens a VM's console stream (hypervisor.Driver.OpenConsole).
type Opener interface {
	OpenConsole(ctx context.Context, vmID string) (io.ReadWriteCloser, error)
}

// Limits bound what the hub holds. Zero fields take the defaults.
type Limits struct {
	// SessionsPerVM and Sessions cap attached sessions per VM and in all
	// (defaults 8 and 64): each holds a queue and a gRPC stream.
	SessionsPerVM int
	Sessions      int
	// ReplayBytes is how much recent output a new session gets (64 KiB).
	ReplayBytes int
	// QueueChunks is how many output chunks may wait for a slow session
	// before it is cut off (256, of at most ChunkBytes each).
	QueueChunks int
}

// ChunkBytes is the most output one Event carries.
const ChunkBytes = 32 << 10

// MaxInputBytes is the most input one Write may carry.
const MaxInputBytes = 4096

func (l Limits) withDefaults() Limits {
	if l.SessionsPerVM <= 0 {
		l.SessionsPerVM = 8
	}
	if l.Sessions <= 0 {
		l.Sessions = 64
	}
	if l.ReplayBytes <= 0 {
		l.ReplayBytes = 64 << 10
	}
	if l.QueueChunks <= 0 {
		l.QueueChunks = 256
	}
	return l
}

// Hub holds the open console streams of one host's VMs.
type Hub struct {
	open Opener
	lim  Limits

	mu  sync.Mutex // guards vms and closing; taken before a vmConsole's mu
	vms map[string]*vmConsole
	// closing holds, per VM, a channel closed once the stream a hub let go
	// of is released by the hypervisor: the next open waits for it, or it
	// would find the console still held.
	closing  map[string]chan struct{}
	sessions atomic.Int64
}

// New returns a hub that opens streams with open.
func New(open Opener, lim Limits) *Hub {
	return &Hub{open: open, lim: lim.withDefaults(), vms: map[string]*vmConsole{}, closing: map[string]chan struct{}{}}
}

// AttachOptions say what a session wants.
type AttachOptions struct {
	// Write asks for the write side; refused while another session has it
	// unless TakeOver.
	Write    bool
	TakeOver bool
	// Who names the user, for the other sessions' messages.
	Who string
	// VMName names the VM in messages (its id when empty).
	VMName string
}

// Event is one thing that happens to a session, in order.
type Event struct {
	Data []byte // console output
	// WriterLost: another session took the write side over. A Message
	// alone is a notice for this session.
	WriterLost bool
	// Closed is set on the last event when the console ended on the
	// host's side (the VM stopped, or the session was too slow).
	Closed  string
	Message string
}

// vmConsole is one VM's open stream and its sessions.
type vmConsole struct {
	id      string
	name    string // for messages
	stream  io.ReadWriteCloser
	ready   chan struct{} // closed once stream is open or openErr set
	openErr error

	mu       sync.Mutex // guards what follows
	sessions map[*Session]struct{}
	writer   *Session
	replay   []byte // the last ReplayBytes of output
	ended    bool

	wmu sync.Mutex // serialises writes to stream
}

// Session is one attached user.
type Session struct {
	hub    *Hub
	vm     *vmConsole
	who    string
	since  time.Time
	events chan Event
	// Attach-time facts for the ConsoleAttached answer.
	Replayed int
	Readers  int

	once sync.Once
}

// Attach joins a session to vmID's console, opening the stream when it is
// the first. Errors: ResourceExhausted past the limits, FailedPrecondition
// when another session writes and TakeOver is not set, and whatever Opener
// returns (NotFound, FailedPrecondition for a stopped VM, Conflict when
// someone outside the hub holds the console).
func (h *Hub) Attach(ctx context.Context, vmID string, opts AttachOptions) (*Session, error) {
	if n := h.sessions.Add(1); n > int64(h.lim.Sessions) {
		h.sessions.Add(-1)
		return nil, errdefs.ResourceExhausted("this host has %d console sessions open, its limit: detach one first", n-1)
	}
	fail := func(err error) (*Session, error) {
		h.sessions.Add(-1)
		return nil, err
	}
	h.mu.Lock()
	vc := h.vms[vmID]
	opener := vc == nil
	var released chan struct{}
	if opener {
		vc = &vmConsole{id: vmID, name: cmp.Or(opts.VMName, vmID), ready: make(chan struct{}), sessions: map[*Session]struct{}{}}
		h.vms[vmID] = vc
		released = h.closing[vmID]
	}
	h.mu.Unlock()

	if opener {
		if released != nil {
			select {
			case <-released:
			case <-ctx.Done():
			}
		}
		stream, err := h.open.OpenConsole(ctx, vmID)
		vc.stream, vc.openErr = stream, err
		if err != nil {
			h.mu.Lock()
			if h.vms[vmID] == vc {
				delete(h.vms, vmID)
			}
			h.mu.Unlock()
		}
		close(vc.ready)
		if err == nil {
			go h.pump(vc)
		}
	} else {
		select {
		case <-vc.ready:
		case <-ctx.Done():
			return fail(errdefs.Wrap(errdefs.KindUnavailable, ctx.Err(), "attach to console of VM %s", vmID))
		}
	}
	if vc.openErr != nil {
		return fail(vc.openErr)
	}

	s := &Session{hub: h, vm: vc, who: opts.Who, since: time.Now(), events: make(chan Event, h.lim.QueueChunks)}
	vc.mu.Lock()
	defer vc.mu.Unlock()
	switch {
	case vc.ended:
		return fail(errdefs.FailedPrecondition("the console of VM %s closed as this session attached (the VM stopped?)", vc.name))
	case len(vc.sessions) >= h.lim.SessionsPerVM:
		return fail(errdefs.ResourceExhausted("VM %s has %d console sessions, its limit: detach one first", vc.name, len(vc.sessions)))
	case opts.Write && vc.writer != nil && !opts.TakeOver:
		w := vc.writer
		return fail(errdefs.FailedPrecondition("the console of VM %s is being written by %s (since %s UTC): attach read-only, or take the write side over",
			vc.name, w.who, w.since.UTC().Format(time.TimeOnly)))
	}
	if opts.Write {
		if old := vc.writer; old != nil {
			old.send(Event{WriterLost: true, Message: fmt.Sprintf("%s took over writing to the console; this session only reads now", opts.Who)})
		}
		vc.writer = s
	}
	vc.sessions[s] = struct{}{}
	s.Readers = len(vc.sessions)
	if len(vc.replay) > 0 {
		s.Replayed = len(vc.replay)
		for b := vc.replay; len(b) > 0; {
			n := min(len(b), ChunkBytes)
			s.send(Event{Data: append([]byte(nil), b[:n]...)})
			b = b[n:]
		}
	}
	return s, nil
}

// pump copies the stream's output to every session until it ends.
func (h *Hub) pump(vc *vmConsole) {
	buf := make([]byte, ChunkBytes)
	reason := "the console closed"
	for {
		n, err := vc.stream.Read(buf)
		if n > 0 {
			chunk := append([]byte(nil), buf[:n]...)
			vc.mu.Lock()
			vc.replay = append(vc.replay, chunk...)
			if over := len(vc.replay) - h.lim.ReplayBytes; over > 0 {
				vc.replay = append(vc.replay[:0], vc.replay[over:]...)
			}
			for s := range vc.sessions {
				if !s.send(Event{Data: chunk}) {
					// Too slow: cut it off rather than stall everyone
					// (and, with libvirt, every call on the connection).
					vc.drop(s)
					s.finish(Event{Closed: "this session read too slowly and was detached"})
				}
			}
			vc.mu.Unlock()
		}
		if err != nil {
			if err != io.EOF {
				reason = fmt.Sprintf("the console closed: %v", err)
			} else {
				reason = "the console closed (the VM stopped or was restarted elsewhere)"
			}
			break
		}
	}
	if h.retire(vc) {
		vc.mu.Lock()
		for s := range vc.sessions {
			vc.drop(s)
			s.finish(Event{Closed: reason})
		}
		vc.mu.Unlock()
		h.release(vc)
	}
}

// retire takes vc out of the hub unless it is out already (false): from
// then on a new Attach opens a new stream.
func (h *Hub) retire(vc *vmConsole) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	vc.mu.Lock()
	defer vc.mu.Unlock()
	if vc.ended {
		return false
	}
	h.retireLocked(vc)
	return true
}

// retireLocked is retire with h.mu and vc.mu held and vc not ended.
func (h *Hub) retireLocked(vc *vmConsole) {
	vc.ended = true
	if h.vms[vc.id] == vc {
		delete(h.vms, vc.id)
	}
	h.closing[vc.id] = make(chan struct{})
}

// release closes a retired vc's stream and lets the next open go ahead.
func (h *Hub) release(vc *vmConsole) {
	vc.stream.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	if ch := h.closing[vc.id]; ch != nil {
		close(ch)
		delete(h.closing, vc.id)
	}
}

// drop removes s from vc. Called with vc.mu held.
func (vc *vmConsole) drop(s *Session) {
	delete(vc.sessions, s)
	if vc.writer == s {
		vc.writer = nil
	}
}

// send queues ev without blocking; false when the queue is full.
func (s *Session) send(ev Event) bool {
	select {
	case s.events <- ev:
		return true
	default:
		return false
	}
}

// finish ends the session's events, with ev last when it says why and
// there is room, and gives its slot back to the hub.
func (s *Session) finish(ev Event) {
	s.once.Do(func() {
		if ev.Closed != "" {
			s.send(ev)
		}
		close(s.events)
		s.hub.sessions.Add(-1)
	})
}

// Events delivers output and notices; it is closed when the session ends.
func (s *Session) Events() <-chan Event { return s.events }

// Notify queues a notice for s alone (dropped if its queue is full).
func (s *Session) Notify(msg string) {
	s.vm.mu.Lock()
	defer s.vm.mu.Unlock()
	if _, attached := s.vm.sessions[s]; attached {
		s.send(Event{Message: msg})
	}
}

// Writer reports whether s holds the write side now.
func (s *Session) Writer() bool {
	s.vm.mu.Lock()
	defer s.vm.mu.Unlock()
	return s.vm.writer == s
}

// Write sends input to the guest; FailedPrecondition unless s writes.
func (s *Session) Write(p []byte) error {
	if len(p) > MaxInputBytes {
		return errdefs.Invalid("console input of %d bytes: at most %d a message", len(p), MaxInputBytes)
	}
	if !s.Writer() {
		return errdefs.FailedPrecondition("this console session only reads: attach with write to type")
	}
	s.vm.wmu.Lock()
	defer s.vm.wmu.Unlock()
	if _, err := s.vm.stream.Write(p); err != nil {
		return errdefs.Wrap(errdefs.KindUnavailable, err, "write to the console of VM %s", s.vm.name)
	}
	return nil
}

// Detach leaves the console; the last session out closes the stream, and
// Detach returns once the hypervisor released it.
func (s *Session) Detach() {
	h, vc := s.hub, s.vm
	h.mu.Lock()
	vc.mu.Lock()
	_, attached := vc.sessions[s]
	vc.drop(s)
	last := attached && len(vc.sessions) == 0 && !vc.ended
	if last {
		h.retireLocked(vc)
	}
	vc.mu.Unlock()
	h.mu.Unlock()
	s.finish(Event{})
	if last {
		h.release(vc)
	}
}
