package metadata

import (
	"errors"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// hangup tells a long-poll that its client went away. net/http noticed it
// with a read in the background of every request; fasthttp reads only
// between requests, so a waiting request watches its socket itself, and
// only while it waits (the common request pays nothing).
type hangup struct {
	c    chan struct{} // closed when the client closed or reset the connection
	conn *peerConn
	done chan struct{} // closed when the watch has ended
}

// watchHangup watches pc's socket until stop. Without a socket (handler
// tests) nothing is watched and c never closes.
func watchHangup(pc *peerConn) *hangup {
	h := &hangup{c: make(chan struct{})}
	if pc == nil {
		return h
	}
	if pc.gone != nil {
		h.c = pc.gone
		return h
	}
	sc, ok := pc.Conn.(syscall.Conn)
	if !ok {
		return h
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return h
	}
	// The request's read deadline would end the watch early: a long-poll
	// outlives it. fasthttp sets a new one before it reads the next
	// request.
	if err := pc.setReadDeadlineNow(time.Time{}); err != nil {
		return h
	}
	h.conn, h.done = pc, make(chan struct{})
	go func() {
		defer close(h.done)
		closed := false
		var b [1]byte
		// MSG_PEEK leaves any byte where fasthttp will read it: a
		// pipelined next request is not consumed, and ends the watch
		// (the client is still there).
		_ = raw.Read(func(fd uintptr) bool {
			n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			switch {
			case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
				return false // nothing yet: wait in the netpoller
			case err != nil || n == 0:
				closed = true // reset, or the client's FIN
			}
			return true
		})
		if closed {
			close(h.c)
		}
	}()
	return h
}

// stop ends the watch and waits for it, so the socket's reads are
// fasthttp's again.
func (h *hangup) stop() {
	if h.done == nil {
		return
	}
	_ = h.conn.setReadDeadlineNow(time.Now())
	<-h.done
}
