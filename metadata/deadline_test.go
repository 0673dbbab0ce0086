package metadata

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// armCounter counts the deadlines armed on the socket under a peerConn.
type armCounter struct {
	net.Conn
	reads, writes atomic.Int32
}

func (c *armCounter) SetReadDeadline(t time.Time) error {
	c.reads.Add(1)
	return c.Conn.SetReadDeadline(t)
}

func (c *armCounter) SetWriteDeadline(t time.Time) error {
	c.writes.Add(1)
	return c.Conn.SetWriteDeadline(t)
}

func pipePeer(t *testing.T) (*peerConn, *armCounter, net.Conn) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	ac := &armCounter{Conn: a}
	return &peerConn{Conn: ac}, ac, b
}

// TestDeadlinesArmedLazily: fasthttp's three deadlines per request (idle
// wait, read timeout, write timeout) reach the socket about once per
// deadlineSlack, not once per request, and a read timeout asked after the
// request was read is never armed.
func TestDeadlinesArmedLazily(t *testing.T) {
	pc, ac, peer := pipePeer(t)
	go func() {
		b := make([]byte, 64)
		for {
			if _, err := peer.Write([]byte("GET / HTTP/1.1\r\n\r\n")); err != nil {
				return
			}
			if _, err := peer.Read(b); err != nil {
				return
			}
		}
	}()
	start := time.Now()
	const requests = 200
	b := make([]byte, 64)
	for i := 0; i < requests; i++ {
		if err := pc.SetReadDeadline(time.Now().Add(60 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := pc.Read(b); err != nil {
			t.Fatal(err)
		}
		if err := pc.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if err := pc.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := pc.Write([]byte("HTTP/1.1 200 OK\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	// Once at the start and once per deadlineSlack that passed.
	most := int32(2 + time.Since(start)/deadlineSlack)
	if r, w := ac.reads.Load(), ac.writes.Load(); r > most || w > most {
		t.Errorf("%d requests armed %d read and %d write deadlines, want at most %d each", requests, r, w, most)
	}
}

// TestLazyDeadlineActs: a deadline asked before a read ends that read,
// never before it was due.
func TestLazyDeadlineActs(t *testing.T) {
	pc, _, _ := pipePeer(t)
	due := time.Now().Add(50 * time.Millisecond)
	if err := pc.SetReadDeadline(due); err != nil {
		t.Fatal(err)
	}
	_, err := pc.Read(make([]byte, 1))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v, want deadline exceeded", err)
	}
	if now := time.Now(); now.Before(due) {
		t.Errorf("deadline acted %s early", due.Sub(now))
	}
}

// TestDeadlineReachesReadInFlight: a deadline asked while a read waits
// ends it (net.Conn's contract), as a past one does at once.
func TestDeadlineReachesReadInFlight(t *testing.T) {
	pc, _, _ := pipePeer(t)
	done := make(chan error, 1)
	go func() {
		_, err := pc.Read(make([]byte, 1))
		done <- err
	}()
	for pc.rd.active.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := pc.SetReadDeadline(time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read in flight: %v, want deadline exceeded", err)
	}
}

// TestDeadlineArmFailureLeavesNoCallInFlight: a read refused because its
// deadline could not be armed (a closed socket) is not counted as in
// flight, so later deadlines wait for the next read again.
func TestDeadlineArmFailureLeavesNoCallInFlight(t *testing.T) {
	pc, _, _ := pipePeer(t)
	if err := pc.SetReadDeadline(time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	pc.Conn.Close()
	if _, err := pc.Read(make([]byte, 1)); err == nil {
		t.Fatal("read on a closed connection succeeded")
	}
	if n := pc.rd.active.Load(); n != 0 {
		t.Errorf("%d reads in flight after a refused one, want 0", n)
	}
}
