package metadata

import (
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestOneGuestCannotHoardConnectionsOrWaits: a guest that opens thousands
// of connections keeps at most MaxConnsPerGuest open (the rest are closed
// at accept), and at most MaxWaitsPerGuest of its wait_for_change requests
// hang (the rest get 429); another guest is served all along.
func TestOneGuestCannotHoardConnectionsOrWaits(t *testing.T) {
	e := newTestEnv(t, func(o *Options) { o.MaxConnsPerGuest, o.MaxWaitsPerGuest = 20, 4 })
	addr := strings.TrimPrefix(e.base, "http://")
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}

	// Hanging waits: 4 wait, the 5th is refused at once.
	waitPath := "/computeMetadata/v1/instance/hostname?wait_for_change=true&timeout_sec=30"
	results := make(chan int, 8)
	for range 4 {
		go func() {
			r := e.do(2, "GET", waitPath, map[string]string{"Metadata-Flavor": "Google"})
			results <- r.code
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for e.srv.waits.Load() < 4 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if r := e.do(2, "GET", waitPath, map[string]string{"Metadata-Flavor": "Google"}); r.code != http.StatusTooManyRequests {
		t.Fatalf("a 5th hanging wait: %d %q, want 429", r.code, r.body)
	}
	e.expect(3, "/latest/meta-data/hostname", 200, "web2.minicloud.internal") // B is not starved

	// Connections: open 500 idle ones from A; at most 20 stay open (4 of
	// them carry the waits above).
	var conns []net.Conn
	for range 500 {
		c, err := d.Dial("tcp4", addr)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	open := 0
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && isTimeout(err) {
			open++ // the server holds it
		}
	}
	if open > 20 {
		t.Fatalf("%d of A's connections held open, want at most 20", open)
	}
	if open == 0 {
		t.Fatal("none of A's connections were held: the limit is not per guest")
	}
	e.expect(3, "/latest/meta-data/hostname", 200, "web2.minicloud.internal")
	if got := counterValue(e.srv.metrics.connsRefused); got < 480 {
		t.Fatalf("connections refused = %v, want at least 480", got)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
