package libvirt

import (
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestDialGivesUpOnALibvirtdThatNeverAnswers: a socket that accepts the
// connection and reads the connect call but never answers (a libvirtd
// shutting down, or wedged) fails the dial after handshakeTimeout, so the
// reconnect loop tries again instead of hanging the agent's start.
func TestDialGivesUpOnALibvirtdThatNeverAnswers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "libvirt-sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c) }() // read, never answer
		}
	}()

	defer func(d time.Duration) { handshakeTimeout = d }(handshakeTimeout)
	handshakeTimeout = 300 * time.Millisecond
	c := &conn{socket: path, log: slog.Default()}
	done := make(chan error, 1)
	go func() {
		_, _, cancel, err := c.dial()
		if cancel != nil {
			cancel()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("dial to a socket that never answers succeeded")
		}
		t.Logf("dial failed as it should: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("dial to a socket that never answers still hangs after 30 s (bound: 300 ms)")
	}
}
