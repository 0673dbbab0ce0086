package metadata

import (
	"errors"
	"net"
	"sync"
	"syscall"
	"time"
)

// peerListener tags accepted connections with the resolver that identifies
// them, and holds each source (a guest) and the whole server to a number
// of open connections.
type peerListener struct {
	net.Listener
	resolver PeerResolver
	// scope names the listener (its bridge): sources are counted per
	// scope and address.
	scope  string
	limits *connLimits

	closeOnce sync.Once
	closeErr  error
}

// Close closes the listener once; later calls return nil. The HTTP server
// closes every listener it served again at shutdown, after RemoveInterface
// or a re-created bridge closed some (it keeps them until then: one small
// struct per bridge ever served, no socket).
func (l *peerListener) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.Listener.Close() })
	return l.closeErr
}

// Accept returns the next connection within the limits. Errors that pass
// (out of file descriptors, a connection aborted before it was accepted)
// are waited out as net/http does, with a growing pause up to a second:
// fasthttp would stop serving the listener for good on them, and a guest
// opening connections must not be able to end the service.
func (l *peerListener) Accept() (net.Conn, error) {
	var pause time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if !temporaryAcceptError(err) {
				return nil, err
			}
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			time.Sleep(pause)
			continue
		}
		pause = 0
		key := l.scope + "/" + remoteHost(c)
		if !l.limits.acquire(key) {
			// Over its share: closed at once, before it costs a goroutine
			// or a buffer (another guest's connections are unaffected).
			c.Close()
			continue
		}
		return &peerConn{Conn: c, resolver: l.resolver, release: func() { l.limits.release(key) }}, nil
	}
}

// temporaryAcceptError says whether accept(2) may succeed if tried again.
func temporaryAcceptError(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, errno) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func remoteHost(c net.Conn) string {
	host, _, err := net.SplitHostPort(c.RemoteAddr().String())
	if err != nil {
		return c.RemoteAddr().String()
	}
	return host
}

// connLimits counts open connections per source and in all.
type connLimits struct {
	perSource, total int
	refused          func()

	mu    sync.Mutex
	open  map[string]int
	inAll int
}

func newConnLimits(perSource, total int, refused func()) *connLimits {
	return &connLimits{perSource: perSource, total: total, refused: refused, open: map[string]int{}}
}

func (l *connLimits) acquire(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[key] >= l.perSource || l.inAll >= l.total {
		if l.refused != nil {
			l.refused()
		}
		return false
	}
	l.open[key]++
	l.inAll++
	return true
}

// count is the number of open connections in all.
func (l *connLimits) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inAll
}

func (l *connLimits) release(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[key]--; l.open[key] <= 0 {
		delete(l.open, key)
	}
	l.inAll--
}

// peerConn resolves its peer once per connection: the bridge and the
// source address cannot change within one TCP connection, and anti-spoofing
// filters keep the source MAC honest.
type peerConn struct {
	net.Conn
	resolver PeerResolver
	release  func()
	closed   sync.Once
	once     sync.Once
	peer     Peer
	err      error

	macOnce sync.Once
	mac     net.HardwareAddr
	macErr  error

	// gone, with the event-loop front end, is closed when the connection
	// closes (the loop reads the socket, so no hang-up watch may).
	gone chan struct{}

	// rd and wd keep the read and write deadlines fasthttp asks for
	// until a read or write needs them (lazyDeadline).
	rd, wd lazyDeadline
}

func (c *peerConn) Read(b []byte) (int, error) {
	if err := c.rd.begin(c.Conn.SetReadDeadline); err != nil {
		return 0, err
	}
	defer c.rd.end()
	return c.Conn.Read(b)
}

func (c *peerConn) Write(b []byte) (int, error) {
	if err := c.wd.begin(c.Conn.SetWriteDeadline); err != nil {
		return 0, err
	}
	defer c.wd.end()
	return c.Conn.Write(b)
}

// SetReadDeadline asks for a read deadline, armed when a read needs it
// (lazyDeadline: it acts at most deadlineSlack later than t).
func (c *peerConn) SetReadDeadline(t time.Time) error {
	return c.rd.set(t, c.Conn.SetReadDeadline)
}

// SetWriteDeadline asks for a write deadline, as SetReadDeadline.
func (c *peerConn) SetWriteDeadline(t time.Time) error {
	return c.wd.set(t, c.Conn.SetWriteDeadline)
}

func (c *peerConn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}

// setReadDeadlineNow arms exactly t on the socket at once, for a reader
// that reads the socket itself rather than through Read (watchHangup).
func (c *peerConn) setReadDeadlineNow(t time.Time) error {
	return c.rd.setNow(t, c.Conn.SetReadDeadline)
}

// Close closes the connection and gives its place back (once).
func (c *peerConn) Close() error {
	c.closed.Do(func() {
		if c.release != nil {
			c.release()
		}
	})
	return c.Conn.Close()
}

func (c *peerConn) resolve() (Peer, error) {
	c.once.Do(func() { c.peer, c.err = c.resolver.ResolvePeer(c.Conn) })
	return c.peer, c.err
}

// sourceMAC is the peer's MAC, looked up at most once per connection.
func (c *peerConn) sourceMAC() (net.HardwareAddr, error) {
	c.macOnce.Do(func() {
		c.mac = c.peer.MAC
		if mr, ok := c.resolver.(macResolver); ok && c.mac == nil {
			c.mac, c.macErr = mr.resolveMAC(c.peer)
		}
	})
	return c.mac, c.macErr
}

type peerConnKey struct{}
