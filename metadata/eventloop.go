package metadata

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/panjf2000/gnet/v2"
	"github.com/valyala/fasthttp"
)

// FrontEnd is how the server moves bytes between guests and the handler.
// Both front ends parse with fasthttp and answer through Server.handle, so
// identity, limits, metrics and the trees are the same; they differ only
// in who waits for the socket.
type FrontEnd uint8

const (
	// FrontEndDefault is defaultFrontEnd.
	FrontEndDefault FrontEnd = iota
	// FrontEndGoroutines is fasthttp's server: a goroutine per connection,
	// parked in the runtime's netpoller between requests.
	FrontEndGoroutines
	// FrontEndEventLoop serves every connection from a few event loops
	// (gnet, one per GOMAXPROCS): a request that arrives whole is parsed
	// and answered in the loop that read it, with no goroutine to wake.
	// Requests that may block (mayBlock) are handed to a goroutine.
	FrontEndEventLoop
)

// defaultFrontEnd is the front end of Options that name none (the tests
// run the whole package once with each). The event loop: a request
// answered where it was read costs no goroutine's park and wake, about a
// third of the goroutine front end's CPU (docs/benchmarks.md).
var defaultFrontEnd = FrontEndEventLoop

func (f FrontEnd) String() string {
	switch f {
	case FrontEndGoroutines:
		return "goroutines"
	case FrontEndEventLoop:
		return "eventloop"
	default:
		return "default"
	}
}

// ParseFrontEnd reads a front end's name as String writes it.
func ParseFrontEnd(s string) (FrontEnd, error) {
	for _, f := range []FrontEnd{FrontEndDefault, FrontEndGoroutines, FrontEndEventLoop} {
		if s == f.String() {
			return f, nil
		}
	}
	return 0, fmt.Errorf("metadata: unknown front end %q (goroutines or eventloop)", s)
}

// Limits of the event loop that fasthttp gets from the socket: it reads a
// request at a time, so a client that sends faster than it is answered is
// held back by TCP. A loop reads whatever arrives, so it bounds what may
// wait instead and closes a connection beyond.
//
// What the kernel does not take of an answer waits in the connection's
// outbound buffer, a copy (fasthttp writes from the rendered body). No
// request is parsed while any waits, so a connection holds at most one
// answer's rest, and only for the write timeout, as fasthttp's. There is
// no smaller bound on it: GCE's custom metadata makes answers of up to
// 512 KiB, and a guest whose vCPU is descheduled for a moment must still
// get them whole.
const (
	// maxLoopInbound bounds the bytes received but not yet answered
	// (pipelined requests behind a long-poll, or behind a reader too slow
	// to take the answers).
	maxLoopInbound = 64 << 10
	// sweepEvery is how often the deadline sweeper looks: deadlines act
	// at most this late, as the fasthttp path's deadlineSlack.
	sweepEvery = deadlineSlack
)

// eventLoop is the event-loop front end: listeners stay Go listeners (a
// bridge's socket options and the per-guest connection limits are
// peerListener's), and each accepted connection is enrolled in one gnet
// client whose loops read, parse and answer it.
type eventLoop struct {
	s   *Server
	cli *gnet.Client
	gnet.BuiltinEventEngine

	// Timeouts as the fasthttp server's (NewServer).
	readTimeout, writeTimeout, idleTimeout time.Duration

	mu        sync.Mutex
	closed    bool
	started   bool
	conns     map[*loopConn]gnet.Conn
	listeners map[net.Listener]struct{}
	// handoffs counts requests answered off the loop, for Close.
	handoffs sync.WaitGroup

	stopSweep chan struct{}
	swept     sync.WaitGroup

	parsers sync.Pool // *loopParser
}

// loopConn is one connection's state. Everything but due is the loop's
// own (or the hand-off goroutine's while busy).
type loopConn struct {
	pc  *peerConn
	ctx fasthttp.RequestCtx
	// busy is set while a request is answered off the loop: requests
	// behind it stay buffered, unparsed, so answers keep their order.
	busy atomic.Bool
	// gone is closed when the connection closes: a long-poll's hang-up.
	gone chan struct{}

	opened    time.Time
	served    int       // requests answered
	lastWrite time.Time // when the last answer was queued
	// pendingSince is when unanswered bytes began to wait (zero: none).
	pendingSince time.Time
	// stuckSince is when the outbound buffer was first seen non-empty.
	stuckSince time.Time
	// continued says 100 Continue was sent for the request pending.
	continued bool
	// due is the next time (unix nanoseconds) the sweeper must wake the
	// connection to check its deadlines; 0 for none.
	due atomic.Int64
}

// loopParser parses one request from bytes the loop holds.
type loopParser struct {
	uri fasthttp.URI
	src bytes.Reader
	br  *bufio.Reader
	out bytes.Buffer
	bw  *bufio.Writer
}

func newEventLoop(s *Server) (*eventLoop, error) {
	el := &eventLoop{
		s:            s,
		readTimeout:  s.http.ReadTimeout,
		writeTimeout: s.http.WriteTimeout,
		idleTimeout:  s.http.IdleTimeout,
		conns:        map[*loopConn]gnet.Conn{},
		listeners:    map[net.Listener]struct{}{},
		stopSweep:    make(chan struct{}),
	}
	el.parsers.New = func() any {
		p := &loopParser{}
		// The reader's size bounds the request line and headers, as the
		// fasthttp server's ReadBufferSize.
		p.br = bufio.NewReaderSize(&p.src, maxHeaderBytes)
		p.bw = bufio.NewWriterSize(&p.out, 4<<10)
		return p
	}
	cli, err := gnet.NewClient(el,
		gnet.WithMulticore(true),
		gnet.WithNumEventLoop(runtime.GOMAXPROCS(0)),
		gnet.WithTCPNoDelay(gnet.TCPNoDelay),
		gnet.WithLogger(gnetLogger{s.log}),
	)
	if err != nil {
		return nil, fmt.Errorf("metadata: event loop: %w", err)
	}
	el.cli = cli
	return el, nil
}

// startLocked starts the loops and the sweeper on the first listener
// served, so a Server used only for its handler (tests, benchmarks of the
// handler) runs no threads; el.mu is held.
func (el *eventLoop) startLocked() error {
	if el.started {
		return nil
	}
	if err := el.cli.Start(); err != nil {
		return fmt.Errorf("metadata: start event loop: %w", err)
	}
	el.started = true
	el.swept.Add(1)
	go el.sweep()
	return nil
}

// serve accepts from l (a peerListener: limits and identity are its) and
// enrolls every connection in the loops, until l closes.
func (el *eventLoop) serve(l net.Listener) error {
	el.mu.Lock()
	if el.closed {
		el.mu.Unlock()
		l.Close()
		return net.ErrClosed
	}
	if err := el.startLocked(); err != nil {
		el.mu.Unlock()
		l.Close()
		return err
	}
	el.listeners[l] = struct{}{}
	el.mu.Unlock()
	defer func() {
		el.mu.Lock()
		delete(el.listeners, l)
		el.mu.Unlock()
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		pc := c.(*peerConn)
		tcp, ok := pc.Conn.(*net.TCPConn)
		if !ok {
			pc.Close()
			continue
		}
		lc := &loopConn{pc: pc, gone: make(chan struct{}), opened: time.Now()}
		// gnet duplicates the descriptor and closes tcp: from here the
		// socket is the loop's, and pc keeps the addresses (identity comes
		// from them, as ever) and reaches the descriptor through
		// loopSocket.
		if _, err := el.cli.EnrollContext(tcp, lc); err != nil {
			el.s.log.Debug("metadata: enroll connection", "err", err)
			pc.Close()
			continue
		}
	}
}

func (el *eventLoop) OnOpen(c gnet.Conn) ([]byte, gnet.Action) {
	lc := c.Context().(*loopConn)
	lc.pc.Conn = loopSocket{Conn: lc.pc.Conn, fd: c.Fd()}
	lc.pc.gone = lc.gone
	el.mu.Lock()
	el.conns[lc] = c
	el.mu.Unlock()
	lc.setDue(lc.opened.Add(el.readTimeout))
	return nil, gnet.None
}

func (el *eventLoop) OnClose(c gnet.Conn, _ error) gnet.Action {
	lc := c.Context().(*loopConn)
	el.mu.Lock()
	delete(el.conns, lc)
	el.mu.Unlock()
	close(lc.gone)
	// Gives the guest's place back (the socket itself is gnet's to close).
	lc.pc.Close()
	return gnet.None
}

func (lc *loopConn) setDue(t time.Time) {
	if t.IsZero() {
		lc.due.Store(0)
		return
	}
	lc.due.Store(t.UnixNano())
}

// OnTraffic parses and answers what the connection holds, and checks its
// deadlines (the sweeper wakes it for them). A panic closes this
// connection with a 500, never the loop.
func (el *eventLoop) OnTraffic(c gnet.Conn) (action gnet.Action) {
	lc := c.Context().(*loopConn)
	defer func() {
		if v := recover(); v != nil {
			el.s.log.Error("metadata event loop panicked", "panic", v, "stack", string(debug.Stack()))
			_, _ = c.Write([]byte("HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"))
			action = gnet.Close
		}
	}()
	return el.traffic(c, lc)
}

func (el *eventLoop) traffic(c gnet.Conn, lc *loopConn) gnet.Action {
	now := time.Now()
	if lc.busy.Load() {
		// Answered off the loop; what arrives meanwhile waits, within
		// bounds.
		if len(peekAll(c)) > maxLoopInbound {
			return gnet.Close
		}
		return gnet.None
	}
	if c.OutboundBuffered() > 0 {
		// The client does not take its answers: parse nothing more
		// until it does, and not forever.
		if lc.stuckSince.IsZero() {
			lc.stuckSince = now
		}
		if now.Sub(lc.stuckSince) >= el.writeTimeout || len(peekAll(c)) > maxLoopInbound {
			return gnet.Close
		}
		// gnet says nothing when the outbound drains: look again at the
		// next sweep.
		lc.setDue(now)
		return gnet.None
	}
	lc.stuckSince = time.Time{}
	for {
		buf := peekAll(c)
		if len(buf) == 0 {
			lc.pendingSince = time.Time{}
			if lc.served == 0 {
				// fasthttp answers a connection that sends nothing within
				// the read timeout with 408.
				if !now.Before(lc.opened.Add(el.readTimeout)) {
					return el.fail(c, lc, os.ErrDeadlineExceeded)
				}
				lc.setDue(lc.opened.Add(el.readTimeout))
				return gnet.None
			}
			if !now.Before(lc.lastWrite.Add(el.idleTimeout)) {
				return gnet.Close
			}
			lc.setDue(lc.lastWrite.Add(el.idleTimeout))
			return gnet.None
		}
		if lc.pendingSince.IsZero() {
			lc.pendingSince = now
		}
		p := el.parsers.Get().(*loopParser)
		used, expect, err := p.read(&lc.ctx.Request, buf)
		el.parsers.Put(p)
		if expect && !lc.continued {
			// The fasthttp server says 100 Continue once the header is
			// read, before the body and whatever the answer.
			lc.continued = true
			if _, err := c.Write(continueLine); err != nil {
				return gnet.Close
			}
		}
		if err != nil {
			if !needMore(err) {
				return el.fail(c, lc, err)
			}
			// The first request's time runs from the opening, as the
			// fasthttp server's; a later one's from its first byte.
			start := lc.pendingSince
			if lc.served == 0 {
				start = lc.opened
			}
			if !now.Before(start.Add(el.readTimeout)) {
				return el.fail(c, lc, os.ErrDeadlineExceeded)
			}
			if len(buf) > maxLoopInbound {
				return gnet.Close
			}
			lc.setDue(start.Add(el.readTimeout))
			return gnet.None
		}
		_, _ = c.Discard(used)
		lc.pendingSince, lc.continued = time.Time{}, false
		lc.ctx.Init2(lc.pc, fasthttpLogger{el.s.log}, false)
		if mayBlock(&lc.ctx.Request) {
			el.handOff(c, lc)
			return gnet.None
		}
		el.s.handle(&lc.ctx)
		closeAfter := el.finish(lc)
		p = el.parsers.Get().(*loopParser)
		out := p.write(&lc.ctx.Response)
		_, err = c.Write(out)
		el.parsers.Put(p)
		lc.served++
		lc.lastWrite = now
		if err != nil || closeAfter {
			return gnet.Close
		}
		if c.OutboundBuffered() > 0 {
			lc.stuckSince = now
			lc.setDue(now)
			return gnet.None
		}
	}
}

var continueLine = []byte("HTTP/1.1 100 Continue\r\n\r\n")

// peekAll is what the connection holds unread.
func peekAll(c gnet.Conn) []byte {
	b, _ := c.Peek(-1)
	return b
}

// read parses one request from the front of buf: used is how many bytes it
// took; expect says its header was read and asks for 100 Continue.
func (p *loopParser) read(req *fasthttp.Request, buf []byte) (used int, expect bool, err error) {
	p.src.Reset(buf)
	p.br.Reset(&p.src)
	req.Reset()
	// Request.ReadLimitBody, with the body read after 100 Continue too,
	// as the fasthttp server reads it.
	if err = req.Header.Read(p.br); err == nil {
		expect = req.MayContinue()
		if n := req.Header.ContentLength(); n > 0 && n <= maxBodyBytes && p.br.Buffered()+p.src.Len() < n {
			// A body of known length not all here yet: wait for it
			// rather than parse a part (a multipart form's parser would
			// call that malformed).
			err = io.ErrUnexpectedEOF
		} else {
			err = req.ContinueReadBody(p.br, maxBodyBytes)
		}
	}
	used = len(buf) - p.src.Len() - p.br.Buffered()
	p.br.Reset(nil)
	if err == nil {
		// The fasthttp server refuses a target it cannot parse before
		// its handler.
		err = p.uri.Parse(req.Header.Host(), req.Header.RequestURI())
	}
	return used, expect, err
}

// write serializes resp; the bytes are valid until p is used again.
func (p *loopParser) write(resp *fasthttp.Response) []byte {
	p.out.Reset()
	p.bw.Reset(&p.out)
	_ = resp.Write(p.bw) // into memory: cannot fail
	_ = p.bw.Flush()
	return p.out.Bytes()
}

// needMore says whether a parse failed only because the request has not
// all arrived: what fasthttp, reading a socket, would have waited for.
func needMore(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, fasthttp.ErrNeedMore)
}

// mayBlock says whether a request may wait on something other than the
// CPU, so it is answered off the loop: GCE's wait_for_change (a
// long-poll) and service-accounts (identity tokens, an RPC). The test is
// on the raw target, so it errs towards handing off: a GCE target with
// any escape (a query's may spell wait_for_change) is handed off too. A
// path's escapes cannot spell computeMetadata: letters are never escaped
// in the canonical encoding, and any other is refused with 404 before the
// trees (parseTarget). Everything else, GCE's recursive renderings
// included, is CPU only and answered in the loop, where a client that
// half-closes after its request still gets its answer (gnet closes a
// connection at its end of stream, answers in flight included).
func mayBlock(req *fasthttp.Request) bool {
	uri := req.Header.RequestURI()
	return bytes.Contains(uri, []byte("computeMetadata")) &&
		(bytes.IndexByte(uri, '%') >= 0 || bytes.Contains(uri, []byte("wait_for_change")) || bytes.Contains(uri, []byte("service-accounts")))
}

// finish completes the response as the fasthttp server does after its
// handler, and says whether the connection closes after it.
func (el *eventLoop) finish(lc *loopConn) (closeAfter bool) {
	req, resp := &lc.ctx.Request, &lc.ctx.Response
	if req.Header.IsHead() {
		resp.SkipBody = true
	}
	closeAfter = req.Header.ConnectionClose() || resp.Header.ConnectionClose()
	if closeAfter {
		resp.Header.SetConnectionClose()
	} else if !req.Header.IsHTTP11() {
		resp.Header.Set(fasthttp.HeaderConnection, "keep-alive")
	}
	return closeAfter
}

// fail answers a request that could not be read (handleError, as the
// fasthttp server does) and closes the connection.
func (el *eventLoop) fail(c gnet.Conn, lc *loopConn, err error) gnet.Action {
	lc.ctx.Init2(lc.pc, fasthttpLogger{el.s.log}, false)
	lc.ctx.Response.Reset()
	el.s.handleError(&lc.ctx, err)
	lc.ctx.SetConnectionClose()
	p := el.parsers.Get().(*loopParser)
	_, _ = c.Write(p.write(&lc.ctx.Response))
	el.parsers.Put(p)
	return gnet.Close
}

// handOff answers the parsed request in a goroutine; the answer goes back
// through the loop, which then parses what waited behind it.
func (el *eventLoop) handOff(c gnet.Conn, lc *loopConn) {
	lc.busy.Store(true)
	lc.setDue(time.Time{})
	el.handoffs.Add(1)
	go func() {
		defer el.handoffs.Done()
		el.s.handle(&lc.ctx)
		closeAfter := el.finish(lc)
		p := el.parsers.Get().(*loopParser)
		out := bytes.Clone(p.write(&lc.ctx.Response))
		el.parsers.Put(p)
		err := c.AsyncWrite(out, func(c gnet.Conn, err error) error {
			lc.served++
			lc.lastWrite = time.Now()
			lc.busy.Store(false)
			if err != nil || closeAfter {
				return c.Close()
			}
			// Requests that waited behind this one.
			return c.Wake(nil)
		})
		if err != nil {
			// The connection closed meanwhile: nothing to answer.
			lc.busy.Store(false)
		}
	}()
}

// sweep wakes connections whose deadline passed: gnet has no deadlines,
// and the loop checks them when woken (traffic).
func (el *eventLoop) sweep() {
	defer el.swept.Done()
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	var due []gnet.Conn
	for {
		select {
		case <-el.stopSweep:
			return
		case now := <-t.C:
			n := now.UnixNano()
			due = due[:0]
			el.mu.Lock()
			for lc, c := range el.conns {
				if d := lc.due.Load(); d != 0 && d <= n {
					due = append(due, c)
				}
			}
			el.mu.Unlock()
			for _, c := range due {
				_ = c.Wake(nil)
			}
		}
	}
}

// close stops accepting, waits for answers off the loop (the caller ended
// long-polls first) and closes every connection.
func (el *eventLoop) close() error {
	el.mu.Lock()
	el.closed = true
	started := el.started
	var errs []error
	for l := range el.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	el.mu.Unlock()
	if !started {
		return errors.Join(errs...)
	}
	el.handoffs.Wait()
	close(el.stopSweep)
	el.swept.Wait()
	if err := el.cli.Stop(); err != nil {
		errs = append(errs, fmt.Errorf("stop event loop: %w", err))
	}
	return errors.Join(errs...)
}

// loopSocket is a connection's socket once the loop owns it: addresses
// from the accepted connection (closed by gnet after it took a duplicate
// descriptor), socket options through the loop's descriptor (setIPTTL,
// which runs in the loop, so the descriptor is open).
type loopSocket struct {
	net.Conn
	fd int
}

func (s loopSocket) SyscallConn() (syscall.RawConn, error) { return fdConn(s.fd), nil }

// fdConn is a descriptor as a syscall.RawConn, for Control only.
type fdConn int

func (fd fdConn) Control(f func(fd uintptr)) error { f(uintptr(fd)); return nil }
func (fdConn) Read(func(fd uintptr) bool) error    { return errors.ErrUnsupported }
func (fdConn) Write(func(fd uintptr) bool) error   { return errors.ErrUnsupported }

// gnetLogger sends gnet's messages to the service's log.
type gnetLogger struct{ log *slog.Logger }

func (l gnetLogger) Debugf(f string, a ...any) { l.log.Debug(gnetMsg(f, a)) }
func (l gnetLogger) Infof(f string, a ...any)  { l.log.Debug(gnetMsg(f, a)) }
func (l gnetLogger) Warnf(f string, a ...any)  { l.log.Warn(gnetMsg(f, a)) }
func (l gnetLogger) Errorf(f string, a ...any) { l.log.Error(gnetMsg(f, a)) }
func (l gnetLogger) Fatalf(f string, a ...any) { l.log.Error(gnetMsg(f, a)) }

func gnetMsg(f string, a []any) string {
	return "gnet: " + strings.TrimSpace(fmt.Sprintf(f, a...))
}
