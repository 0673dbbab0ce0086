package metadata

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rawConn dials the test server from 127.0.0.<from>, for requests a
// well-behaved HTTP client would not send.
func (e *testEnv) rawConn(from int) (net.Conn, *bufio.Reader) {
	e.t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(from))}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp4", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c, bufio.NewReader(c)
}

// raw sends one request as written and reads the answer.
func (e *testEnv) raw(from int, request string) result {
	e.t.Helper()
	c, br := e.rawConn(from)
	if _, err := io.WriteString(c, request); err != nil {
		e.t.Fatal(err)
	}
	return readResult(e.t, br)
}

func readResult(t *testing.T, br *bufio.Reader) result {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return result{code: resp.StatusCode, body: string(b), header: resp.Header}
}

// TestRequestTargetsAsNetHTTP: the service reads request targets as
// net/http did, not as fasthttp normalises them: empty and dot segments
// and encodings other than the canonical one are refused, not cleaned up
// into another path; absolute-form targets are served.
func TestRequestTargetsAsNetHTTP(t *testing.T) {
	e := newTestEnv(t, nil)
	for _, c := range []struct {
		target string
		code   int
	}{
		{"/latest/meta-data/instance-id", 200},
		{"http://169.254.169.254/latest/meta-data/instance-id", 200},
		{"/latest//meta-data/instance-id", 404},
		{"/latest/meta-data/../meta-data/instance-id", 404},
		{"/latest/meta-data/./instance-id", 404},
		{"/latest/meta-data/%69nstance-id", 404},
		{"/latest/meta-data/instance-id%2F", 404},
		{"/openstack/latest/meta_data.json#x", 404},
		{"/computeMetadata/v1/instance/id?alt=text", 200},
	} {
		got := e.raw(2, "GET "+c.target+" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata-Flavor: Google\r\n\r\n")
		if got.code != c.code || (c.code == 200 && got.body != idA && !strings.Contains(got.body, idA)) {
			t.Errorf("GET %s = %d %q, want %d", c.target, got.code, got.body, c.code)
		}
	}
}

// TestForwardedHeaderEvenEmpty: a request that passed through a proxy
// (any X-Forwarded-For, even an empty one) gets no token and no GCE answer.
func TestForwardedHeaderEvenEmpty(t *testing.T) {
	e := newTestEnv(t, nil)
	if got := e.raw(2, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For:\r\nContent-Length: 0\r\n\r\n"); got.code != 403 {
		t.Errorf("token PUT with an empty X-Forwarded-For: %d %q, want 403", got.code, got.body)
	}
	if got := e.raw(2, "GET /computeMetadata/v1/instance/id HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nx-forwarded-for: \r\n\r\n"); got.code != 403 {
		t.Errorf("GCE GET with an empty x-forwarded-for: %d %q, want 403", got.code, got.body)
	}
}

// TestRequestLimits: headers over 8 KiB and bodies over 4 KiB are refused
// before the handler, answered, and counted; pipelined requests are
// answered in order; no Server header names the software.
func TestRequestLimits(t *testing.T) {
	e := newTestEnv(t, nil)
	big := e.raw(2, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-Pad: "+strings.Repeat("a", 9<<10)+"\r\n\r\n")
	if big.code != 431 {
		t.Errorf("9 KiB header: %d, want 431", big.code)
	}
	body := e.raw(2, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 5000\r\n\r\n"+strings.Repeat("b", 5000))
	if body.code != 413 {
		t.Errorf("5000-byte body: %d, want 413", body.code)
	}
	if got := counterValue(e.srv.metrics.requests.WithLabelValues("ec2", "431")) + counterValue(e.srv.metrics.requests.WithLabelValues("ec2", "413")); got != 2 {
		t.Errorf("refused requests counted %v times, want 2", got)
	}

	c, br := e.rawConn(2)
	req := "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"
	if _, err := io.WriteString(c, req+strings.Replace(req, "instance-id", "hostname", 1)); err != nil {
		t.Fatal(err)
	}
	first, second := readResult(t, br), readResult(t, br)
	if first.body != idA || second.body != "web1.minicloud.internal" {
		t.Errorf("pipelined: %q then %q", first.body, second.body)
	}
	if s := first.header.Get("Server"); s != "" {
		t.Errorf("Server header %q", s)
	}
}

// TestSlowRequestIsCut: a request whose header does not arrive within the
// read timeout is answered 408 and its connection closed.
func TestSlowRequestIsCut(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the read timeout")
	}
	e := newTestEnv(t, nil)
	c, br := e.rawConn(2)
	start := time.Now()
	if _, err := io.WriteString(c, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n"); err != nil {
		t.Fatal(err)
	}
	got := readResult(t, br)
	if got.code != 408 || time.Since(start) > readTimeout+2*time.Second {
		t.Errorf("slow header: %d after %v, want 408 after about %v", got.code, time.Since(start), readTimeout)
	}
	if _, err := br.ReadByte(); err == nil {
		t.Error("connection still open after 408")
	}
}

// TestLongPollEndsWhenClientLeaves: a wait_for_change whose client closes
// its connection gives its place back at once, not at its timeout.
func TestLongPollEndsWhenClientLeaves(t *testing.T) {
	e := newTestEnv(t, func(o *Options) { o.MaxWaitsPerGuest = 1 })
	path := "/computeMetadata/v1/instance/hostname?wait_for_change=true&timeout_sec=300"
	c, _ := e.rawConn(2)
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	waitForWaiters(t, e, 1)
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for e.srv.waits.Load() != 0 || gaugeValue(e.srv.metrics.longPollWaiters) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("wait still held 5s after its client left")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The guest's one place is free again: a new wait parks (and a stale
	// last_etag answers at once on the same connection, which the watch
	// left readable).
	c2, br := e.rawConn(2)
	if _, err := io.WriteString(c2, "GET "+path+"&last_etag=0 HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if got := readResult(t, br); got.code != 200 || got.body != "web1.minicloud.internal" {
		t.Fatalf("stale etag: %d %q", got.code, got.body)
	}
	if _, err := io.WriteString(c2, "GET "+path+" HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	waitForWaiters(t, e, 1)
	a, _ := e.dir.Get(idA)
	a2 := *a
	a2.Hostname = "web1b"
	if err := e.dir.Upsert(&a2); err != nil {
		t.Fatal(err)
	}
	if got := readResult(t, br); got.code != 200 || got.body != "web1b.minicloud.internal" {
		t.Fatalf("after change: %d %q", got.code, got.body)
	}
	// The connection is still usable after a long-poll.
	if _, err := io.WriteString(c2, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if got := readResult(t, br); got.code != 200 || got.body != idA {
		t.Fatalf("request after a long-poll: %d %q", got.code, got.body)
	}
}

// TestCloseEndsLongPolls: shutting the service down answers the waiting
// long-polls and returns promptly.
func TestCloseEndsLongPolls(t *testing.T) {
	e := newTestEnv(t, nil)
	c, br := e.rawConn(2)
	if _, err := io.WriteString(c, "GET /computeMetadata/v1/instance/hostname?wait_for_change=true HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	waitForWaiters(t, e, 1)
	start := time.Now()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Close took %v with a long-poll waiting", d)
	}
	if got := readResult(t, br); got.code != 200 {
		t.Errorf("long-poll at shutdown: %d", got.code)
	}
}

// flakyListener fails its first Accepts with errors that pass.
type flakyListener struct {
	net.Listener
	fails []error
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if len(l.fails) > 0 {
		err := l.fails[0]
		l.fails = l.fails[1:]
		return nil, err
	}
	return l.Listener.Accept()
}

// TestAcceptOutlivesTemporaryErrors: running out of file descriptors (a
// guest opening connections) pauses accepting, it does not end the
// service as fasthttp alone would.
func TestAcceptOutlivesTemporaryErrors(t *testing.T) {
	inner, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	l := &peerListener{
		Listener: &flakyListener{Listener: inner, fails: []error{
			&net.OpError{Op: "accept", Err: syscall.EMFILE},
			&net.OpError{Op: "accept", Err: syscall.ECONNABORTED},
		}},
		limits: newConnLimits(4, 4, nil),
	}
	go func() {
		c, err := net.Dial("tcp4", inner.Addr().String())
		if err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept after temporary errors: %v", err)
	}
	c.Close()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("accept on a closed listener: %v", err)
	}
}
