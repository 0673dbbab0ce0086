package metadata

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain runs the whole package once per front end: every test of
// limits, timeouts, IMDSv2, long-polls and live namespaces holds for both.
func TestMain(m *testing.M) {
	for _, f := range []FrontEnd{FrontEndGoroutines, FrontEndEventLoop} {
		defaultFrontEnd = f
		fmt.Fprintf(os.Stderr, "=== front end %s\n", f)
		if code := m.Run(); code != 0 {
			fmt.Fprintf(os.Stderr, "--- FAIL: front end %s\n", f)
			os.Exit(code)
		}
	}
	os.Exit(0)
}

// exchange sends request on a new connection from 127.0.0.<from> and
// returns the answer's bytes as they came (but Date and random_seed).
// With drip, the request goes out a few bytes at a time, each its own
// segment.
func (e *testEnv) exchange(from int, method, request string, drip bool) string {
	e.t.Helper()
	c, _ := e.rawConn(from)
	for rest := request; rest != ""; {
		n := len(rest)
		if drip {
			n = min(n, 7)
			time.Sleep(time.Millisecond)
		}
		if _, err := io.WriteString(c, rest[:n]); err != nil {
			e.t.Fatal(err)
		}
		rest = rest[n:]
	}
	var got bytes.Buffer
	br := bufio.NewReader(io.TeeReader(c, &got))
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	for err == nil && resp.StatusCode == http.StatusContinue {
		resp, err = http.ReadResponse(br, &http.Request{Method: method})
	}
	if err != nil {
		e.t.Fatalf("%q: read response: %v", request, err)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		e.t.Fatal(err)
	}
	resp.Body.Close()
	b := dateLine.ReplaceAll(got.Bytes(), []byte("Date: -\r\n"))
	return string(randomSeed.ReplaceAll(b, []byte(`"random_seed":"-"`)))
}

// Date and OpenStack's random seed (drawn per rendering, its length kept)
// are all that may differ.
var (
	dateLine   = regexp.MustCompile(`Date: [^\r]*\r\n`)
	randomSeed = regexp.MustCompile(`"random_seed":"[^"]*"`)
)

// TestFrontEndsAnswerAlike: the same requests get the same bytes from
// both front ends (apart from Date), sent whole or a few bytes at a time:
// one handler, the front end only moves bytes.
func TestFrontEndsAnswerAlike(t *testing.T) {
	key := make(map[FrontEnd]*testEnv)
	for _, f := range []FrontEnd{FrontEndGoroutines, FrontEndEventLoop} {
		key[f] = newTestEnv(t, func(o *Options) { o.FrontEnd = f })
	}
	gce := "Metadata-Flavor: Google\r\n"
	requests := []struct {
		from           int
		method, target string
		more           string // headers, and a body
		proto          string
	}{
		{2, "GET", "/latest/meta-data/instance-id", "", ""},
		{2, "HEAD", "/latest/meta-data/instance-id", "", ""},
		{2, "GET", "/latest/meta-data/", "", ""},
		{2, "GET", "/", "", ""},
		{3, "GET", "/latest/meta-data/public-keys/", "", ""},
		{2, "GET", "/latest/user-data", "", "HTTP/1.0"},
		{2, "GET", "/latest/meta-data/instance-id", "Connection: close\r\n", ""},
		{2, "GET", "/latest//meta-data", "", ""},
		{2, "GET", "/latest/meta-data/%69nstance-id", "", ""},
		{2, "GET", "/latest/meta-%zz", "", ""},
		{2, "GET", "http://169.254.169.254/latest/meta-data/hostname", "", ""},
		{2, "POST", "/latest/meta-data/instance-id", "", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0\r\n", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n", ""},
		{2, "GET", "/latest/meta-data/instance-id", "X-aws-ec2-metadata-token: garbage\r\n", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 5000\r\n\r\n" + strings.Repeat("b", 5000), ""},
		{2, "GET", "/latest/meta-data/instance-id", "X-Pad: " + strings.Repeat("a", 9<<10) + "\r\n", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n", ""},
		{2, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", ""},
		{2, "GET", "/openstack/latest/meta_data.json", "", ""},
		{2, "GET", "/openstack", "", ""},
		{2, "GET", "/computeMetadata/v1/instance/hostname", gce, ""},
		{2, "GET", "/computeMetadata/v1/instance/hostname", "", ""},
		{2, "GET", "/computeMetadata/v1/instance", gce, ""},
		{2, "GET", "/computeMetadata/v1/instance/?recursive=true", gce, ""},
		{2, "GET", "/computeMetadata/v1/instance/?recursive=true&alt=text", gce, ""},
		{2, "GET", "/computeMetadata/v1/instance/hostname?alt=xml", gce, ""},
		{2, "GET", "/computeMetadata/v1/instance/hostname?wait_for_change=true&last_etag=0", gce, ""},
		{2, "GET", "/computeMetadata/v1/instance/service-accounts/", gce, ""},
		{9, "GET", "/latest/meta-data/instance-id", "", ""},
		{4, "GET", "/latest/meta-data/instance-id", "", ""},
	}
	for _, r := range requests {
		proto := r.proto
		if proto == "" {
			proto = "HTTP/1.1"
		}
		raw := r.method + " " + r.target + " " + proto + "\r\nHost: 169.254.169.254\r\n" + r.more
		if !strings.Contains(r.more, "\r\n\r\n") {
			raw += "\r\n"
		}
		for _, drip := range []bool{false, true} {
			if drip && len(raw) > 1<<10 {
				continue
			}
			want := key[FrontEndGoroutines].exchange(r.from, r.method, raw, drip)
			if got := key[FrontEndEventLoop].exchange(r.from, r.method, raw, drip); got != want {
				t.Errorf("%s %s from 127.0.0.%d (dripped: %v):\ngoroutines:\n%s\nevent loop:\n%s", r.method, r.target, r.from, drip, want, got)
			}
		}
	}
}

// TestPipelinedBehindLongPollKeepsOrder: a request pipelined behind a
// wait_for_change is answered after it, on the same connection, and the
// long-poll still sees the change it waits for.
func TestPipelinedBehindLongPollKeepsOrder(t *testing.T) {
	e := newTestEnv(t, nil)
	c, br := e.rawConn(2)
	wait := "GET /computeMetadata/v1/instance/hostname?wait_for_change=true&timeout_sec=300 HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"
	next := "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"
	if _, err := io.WriteString(c, wait+next+next); err != nil {
		t.Fatal(err)
	}
	waitForWaiters(t, e, 1)
	a, _ := e.dir.Get(idA)
	a2 := *a
	a2.Hostname = "web1c"
	if err := e.dir.Upsert(&a2); err != nil {
		t.Fatal(err)
	}
	if got := readResult(t, br); got.code != 200 || got.body != "web1c.minicloud.internal" {
		t.Fatalf("long-poll: %d %q", got.code, got.body)
	}
	for i := 0; i < 2; i++ {
		if got := readResult(t, br); got.code != 200 || got.body != idA {
			t.Fatalf("pipelined request %d after the long-poll: %d %q", i, got.code, got.body)
		}
	}
}

// heldIdentity is an identity source that holds every call until release
// is closed: a stand-in for the API, so that a token RPC can be kept in
// flight for as long as the test needs.
type heldIdentity struct {
	release chan struct{}
	calls   atomic.Int64
}

func (h *heldIdentity) IdentityToken(ctx context.Context, vmID, aud string, _ bool) (string, time.Time, error) {
	h.calls.Add(1)
	select {
	case <-h.release:
		return "token-for-" + aud, time.Now().Add(time.Hour), nil
	case <-ctx.Done():
		return "", time.Time{}, ctx.Err()
	}
}

// TestBlockedRequestsNeverStallOthers: long-polls and identity calls in
// flight, however their target is spelt, leave every other request
// answered, the waiting guest's own included.
func TestBlockedRequestsNeverStallOthers(t *testing.T) {
	src := &heldIdentity{release: make(chan struct{})}
	e := newTestEnv(t, func(o *Options) { o.Identity = src })
	gce := "Host: x\r\nMetadata-Flavor: Google\r\n\r\n"
	polls := []string{
		"/computeMetadata/v1/instance/hostname?wait_for_change=true",
		"http://169.254.169.254/computeMetadata/v1/instance/hostname?wait_for_change=true",
		"/computeMetadata/v1/instance/hostname?wait%5Ffor%5Fchange=true",
		"/computeMetadata/v1/instance/%68ostname?wait_for_change=true",
	}
	var waiting []*bufio.Reader
	for _, p := range polls {
		c, br := e.rawConn(2)
		if _, err := io.WriteString(c, "GET "+p+" HTTP/1.1\r\n"+gce); err != nil {
			t.Fatal(err)
		}
		waiting = append(waiting, br)
	}
	auds := []string{"a1", "a2", "a3", "a4"}
	for _, aud := range auds {
		c, br := e.rawConn(2)
		if _, err := io.WriteString(c, "GET /computeMetadata/v1/instance/service-accounts/default/identity?audience="+aud+" HTTP/1.1\r\n"+gce); err != nil {
			t.Fatal(err)
		}
		waiting = append(waiting, br)
	}
	// The escaped path is refused by the handler (404) before it waits.
	waitForWaiters(t, e, float64(len(polls)-1))
	for deadline := time.Now().Add(10 * time.Second); src.calls.Load() < int64(len(auds)); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d identity calls in flight after 10s, want %d", src.calls.Load(), len(auds))
		}
	}
	// Enough connections for both loops, from both guests.
	for i := 0; i < 8; i++ {
		e.expect(2, "/latest/meta-data/instance-id", 200, idA)
		e.expect(3, "/computeMetadata/v1/instance/hostname?recursive=true", 403, "")
		e.expect(3, "/openstack", 200, "")
	}
	close(src.release)
	for i, aud := range auds {
		if got := readResult(t, waiting[len(polls)+i]); got.code != 200 || got.body != "token-for-"+aud {
			t.Errorf("identity %s: %d %q", aud, got.code, got.body)
		}
	}
}

// TestClientThatDoesNotReadIsCut: a guest that pipelines requests for a
// large answer and never reads them has its connection closed (and its
// place given back) after the write timeout; meanwhile others are served.
func TestClientThatDoesNotReadIsCut(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the write timeout")
	}
	e := newTestEnv(t, nil)
	a, _ := e.dir.Get(idA)
	big := *a
	big.UserData = bytes.Repeat([]byte("#"), 60<<10)
	if err := e.dir.Upsert(&big); err != nil {
		t.Fatal(err)
	}
	c := smallWindowConn(t, e, 2)
	req := strings.Repeat("GET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n", 64)
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	e.expect(3, "/latest/meta-data/instance-id", 200, idB)
	for deadline := time.Now().Add(30 * time.Second); e.srv.conns.count() > 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a client that does not read still holds its connection after 30s")
		}
	}
	e.expect(2, "/latest/meta-data/instance-id", 200, idA)
}

// TestHalfClosedClientIsAnswered: a client that ends its side after its
// request (shutdown(SHUT_WR), as `nc -N` does) still gets the answer.
func TestHalfClosedClientIsAnswered(t *testing.T) {
	e := newTestEnv(t, nil)
	for _, p := range []string{"/latest/meta-data/instance-id", "/computeMetadata/v1/instance/?recursive=true", "/latest/meta-data/%69nstance-id"} {
		c, br := e.rawConn(2)
		if _, err := io.WriteString(c, "GET "+p+" HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if got := readResult(t, br); got.code == 0 {
			t.Errorf("%s: no answer", p)
		}
	}
}

// TestSlowReaderGetsALargeAnswerWhole: an answer larger than the socket
// takes at once reaches a client that starts reading only a while later,
// within the write timeout. 4 MiB is more than a loopback socket takes (as
// GCE's 512 KiB of custom metadata is on a bridge, where the MTU is
// smaller).
func TestSlowReaderGetsALargeAnswerWhole(t *testing.T) {
	e := newTestEnv(t, nil)
	a, _ := e.dir.Get(idA)
	big := *a
	big.Attributes = map[string]string{"big": strings.Repeat("x", 4<<20)}
	if err := e.dir.Upsert(&big); err != nil {
		t.Fatal(err)
	}
	c := smallWindowConn(t, e, 2)
	if _, err := io.WriteString(c, "GET /computeMetadata/v1/instance/attributes/big HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Longer than the sweeps that look at a connection with an answer
	// waiting.
	time.Sleep(3 * sweepEvery)
	if got := readResult(t, bufio.NewReader(c)); got.code != 200 || len(got.body) != 4<<20 {
		t.Fatalf("large answer to a slow reader: %d, %d bytes", got.code, len(got.body))
	}
}

// smallWindowConn dials the test server from 127.0.0.<from> with a small
// receive buffer, so what the client does not read stays with the server.
func smallWindowConn(t *testing.T, e *testEnv, from int) net.Conn {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(from))}, Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { _ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) })
	}}
	c, err := d.Dial("tcp4", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}
