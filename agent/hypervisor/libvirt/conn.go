package libvirt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/google/uuid"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// conn keeps one connection to libvirtd alive: it dials, subscribes to
// lifecycle events, and when libvirtd goes away (restart, crash) it dials
// again with backoff, re-subscribes and tells the consumer to resync.
type conn struct {
	socket string
	log    *slog.Logger

	mu      sync.Mutex
	cur     *golibvirt.Libvirt // nil while disconnected
	ready   chan struct{}      // closed when cur becomes non-nil
	lastErr error
	waiters map[string]map[chan struct{}]struct{} // vm id -> wake-up channels

	events     chan hypervisor.Event
	overflowed bool // an event was dropped; a resync is owed

	// statuses are the domain states read on this connection, kept until
	// an event says otherwise (statuscache.go).
	statuses statusCache

	stop chan struct{}
	done chan struct{}
}

func newConn(socket string, log *slog.Logger) *conn {
	c := &conn{
		socket:  socket,
		log:     log,
		ready:   make(chan struct{}),
		waiters: map[string]map[chan struct{}]struct{}{},
		events:  make(chan hypervisor.Event, 1024),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),

		statuses: statusCache{grace: reattachGrace},
	}
	go c.run()
	return c
}

// get returns the live connection, waiting for one until ctx ends.
func (c *conn) get(ctx context.Context) (*golibvirt.Libvirt, error) {
	for {
		c.mu.Lock()
		l, ready, lastErr := c.cur, c.ready, c.lastErr
		c.mu.Unlock()
		if l != nil {
			return l, nil
		}
		select {
		case <-ready:
		case <-c.stop:
			return nil, errdefs.Unavailable("libvirt driver closed")
		case <-ctx.Done():
			if lastErr == nil {
				lastErr = ctx.Err()
			}
			return nil, errdefs.Wrap(errdefs.KindUnavailable, lastErr, "libvirtd at %s not connected", c.socket)
		}
	}
}

func (c *conn) run() {
	defer close(c.done)
	defer close(c.events)
	backoff := 50 * time.Millisecond
	first := true
	for {
		l, evs, cancel, err := c.dial()
		if err != nil {
			c.mu.Lock()
			c.lastErr = err
			c.mu.Unlock()
			// Quiet while libvirtd restarts; loud once it stays away.
			level := slog.LevelDebug
			if backoff >= 2*time.Second {
				level = slog.LevelWarn
			}
			c.log.Log(context.Background(), level, "libvirt connect failed", "socket", c.socket, "err", err, "retry_in", backoff)
			select {
			case <-c.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		c.statuses.reset(time.Now())
		c.mu.Lock()
		c.cur, c.lastErr = l, nil
		close(c.ready)
		c.mu.Unlock()
		if !first {
			c.log.Info("reconnected to libvirtd", "socket", c.socket)
			c.emit(hypervisor.Event{Kind: hypervisor.EventResync, Detail: "reconnected to libvirtd", Time: time.Now()})
		}
		first = false
		c.wakeAll()

		stopped := c.pump(l, evs)
		c.statuses.reset(time.Time{})
		cancel()
		c.mu.Lock()
		c.cur = nil
		c.ready = make(chan struct{})
		c.lastErr = errors.New("connection to libvirtd lost")
		c.mu.Unlock()
		c.wakeAll()
		if stopped {
			_ = l.Disconnect()
			return
		}
		c.log.Warn("lost connection to libvirtd; reconnecting", "socket", c.socket)
	}
}

func (c *conn) dial() (*golibvirt.Libvirt, <-chan golibvirt.DomainEventLifecycleMsg, context.CancelFunc, error) {
	sock := &recordedSocket{Dialer: dialers.NewLocal(dialers.WithSocket(c.socket), dialers.WithLocalTimeout(2*time.Second))}
	l := golibvirt.NewWithDialer(sock)
	// go-libvirt's calls have no deadline: close the socket under them when
	// the handshake takes too long, so that they fail and run() dials again.
	expired := time.AfterFunc(handshakeTimeout, sock.close)
	if err := l.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		expired.Stop()
		return nil, nil, nil, fmt.Errorf("connect to %s: %w", c.socket, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	evs, err := l.LifecycleEvents(ctx)
	if !expired.Stop() && err == nil {
		err = fmt.Errorf("no answer within %s", handshakeTimeout)
	}
	if err != nil {
		cancel()
		sock.close()
		return nil, nil, nil, fmt.Errorf("subscribe to lifecycle events on %s: %w", c.socket, err)
	}
	return l, evs, cancel, nil
}

// handshakeTimeout bounds a connection's set-up (connect call and event
// subscription). A libvirtd that accepts a connection but never answers it
// (one shutting down, or wedged) would otherwise hold the agent's start,
// which waits for the host's capabilities, forever.
var handshakeTimeout = 20 * time.Second

// recordedSocket is a dialer that keeps the connection it made, so that
// dial can close it under go-libvirt.
type recordedSocket struct {
	socket.Dialer

	mu     sync.Mutex
	conn   net.Conn
	closed bool
}

func (r *recordedSocket) Dial() (net.Conn, error) {
	c, err := r.Dialer.Dial()
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		c.Close()
		return nil, errors.New("libvirtd connection set-up timed out")
	}
	r.conn = c
	return c, nil
}

func (r *recordedSocket) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	if r.conn != nil {
		r.conn.Close()
	}
}

// pump forwards events until the connection drops (false) or Close (true).
func (c *conn) pump(l *golibvirt.Libvirt, evs <-chan golibvirt.DomainEventLifecycleMsg) bool {
	for {
		select {
		case <-c.stop:
			return true
		case <-l.Disconnected():
			return false
		case m, ok := <-evs:
			if !ok {
				// The stream ends when the socket does; wait for the
				// disconnect to be observable so get() does not hand out
				// the dead connection.
				select {
				case <-l.Disconnected():
				case <-c.stop:
					return true
				case <-time.After(time.Second):
				}
				return false
			}
			vmID, ok := vmIDFromDomainName(m.Dom.Name)
			if !ok {
				continue // not one of ours
			}
			kind, detail := translateLifecycle(m.Event, m.Detail)
			c.statuses.invalidate(vmID)
			c.wake(vmID)
			c.emit(hypervisor.Event{VMID: vmID, Kind: kind, Detail: detail, Time: time.Now()})
		}
	}
}

// emit never blocks the event pump: when the consumer lags and the buffer is
// full the event is dropped and a resync is delivered as soon as there is
// room, so a consumer can never miss a change without knowing.
func (c *conn) emit(ev hypervisor.Event) {
	if c.overflowed {
		select {
		case c.events <- hypervisor.Event{Kind: hypervisor.EventResync, Detail: "events dropped: consumer too slow", Time: time.Now()}:
			c.overflowed = false
		default:
			return
		}
	}
	select {
	case c.events <- ev:
	default:
		c.overflowed = true
	}
}

// watch registers interest in events of one VM; the returned channel gets a
// token whenever something may have changed (an event, a reconnect).
func (c *conn) watch(vmID string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	c.mu.Lock()
	if c.waiters[vmID] == nil {
		c.waiters[vmID] = map[chan struct{}]struct{}{}
	}
	c.waiters[vmID][ch] = struct{}{}
	c.mu.Unlock()
	return ch, func() {
		c.mu.Lock()
		delete(c.waiters[vmID], ch)
		if len(c.waiters[vmID]) == 0 {
			delete(c.waiters, vmID)
		}
		c.mu.Unlock()
	}
}

func (c *conn) wake(vmID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ch := range c.waiters[vmID] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func (c *conn) wakeAll() {
	c.mu.Lock()
	ids := make([]string, 0, len(c.waiters))
	for id := range c.waiters {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	for _, id := range ids {
		c.wake(id)
	}
}

func (c *conn) close() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

// vmIDFromDomainName accepts only names minicloud gives: "mc-" + a UUID.
func vmIDFromDomainName(name string) (string, bool) {
	id, ok := strings.CutPrefix(name, hypervisor.DomainNamePrefix)
	if !ok {
		return "", false
	}
	if _, err := uuid.Parse(id); err != nil || len(id) != 36 {
		return "", false
	}
	return id, true
}

func translateLifecycle(event, detail int32) (hypervisor.EventKind, string) {
	switch golibvirt.DomainEventType(event) {
	case golibvirt.DomainEventDefined:
		return hypervisor.EventDefined, pick(detail, "added", "updated", "renamed", "from-snapshot")
	case golibvirt.DomainEventUndefined:
		return hypervisor.EventUndefined, pick(detail, "removed", "renamed")
	case golibvirt.DomainEventStarted:
		return hypervisor.EventStarted, pick(detail, "booted", "migrated", "restored", "from-snapshot", "wakeup")
	case golibvirt.DomainEventSuspended:
		return hypervisor.EventSuspended, pick(detail, "paused", "migrated", "ioerror", "watchdog", "restored", "from-snapshot", "api-error", "postcopy", "postcopy-failed")
	case golibvirt.DomainEventResumed:
		return hypervisor.EventResumed, pick(detail, "unpaused", "migrated", "from-snapshot", "postcopy")
	case golibvirt.DomainEventStopped:
		return hypervisor.EventStopped, pick(detail, "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot")
	case golibvirt.DomainEventShutdown:
		return hypervisor.EventShutdown, pick(detail, "finished", "guest", "host")
	case golibvirt.DomainEventCrashed:
		return hypervisor.EventCrashed, pick(detail, "panicked", "crashloaded")
	case golibvirt.DomainEventPmsuspended:
		return hypervisor.EventSuspended, "pmsuspended"
	}
	return hypervisor.EventKind(fmt.Sprintf("event-%d", event)), fmt.Sprintf("detail-%d", detail)
}

func pick(i int32, names ...string) string {
	if i >= 0 && int(i) < len(names) {
		return names[i]
	}
	return fmt.Sprintf("detail-%d", i)
}
