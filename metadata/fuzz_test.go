package metadata

import (
	"net"
	"net/netip"
	"net/url"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// FuzzSplitPath: whatever the input, accepted paths have no dot segments,
// no empty inner segments and no control bytes.
func FuzzSplitPath(f *testing.F) {
	for _, s := range []string{"/", "/latest/meta-data/", "/latest//x", "/../x", "/a/./b", "/a/b/", "/\x00", strings.Repeat("/a", 600)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		segs, ok := splitPath(p)
		if !ok {
			return
		}
		if len(p) > maxPathLen {
			t.Fatalf("accepted a %d-byte path", len(p))
		}
		for i, s := range segs {
			if s == "." || s == ".." || (s == "" && i != len(segs)-1) || strings.ContainsAny(s, "\x00\r\n /") {
				t.Fatalf("accepted %q as segment %d of %q", s, i, p)
			}
		}
	})
}

// FuzzRouter drives the whole handler with arbitrary methods, paths,
// queries and headers, as guest A: it must never panic, answer with a
// status from the expected set, and never show B's data to A.
func FuzzRouter(f *testing.F) {
	a := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	a.UserData = []byte("#cloud-config\n")
	b := testInstance(idB, "web2", "10.0.0.6", "52:54:00:00:00:0b")
	dir := NewDirectory()
	if err := dir.Set([]*Instance{a, b}); err != nil {
		f.Fatal(err)
	}
	srv, err := NewServer(dir, Options{RateLimit: 1e9, RateBurst: 1 << 30})
	if err != nil {
		f.Fatal(err)
	}
	// Long-polls would wait: as at shutdown, they answer at once (fuzzing
	// the first answer is enough).
	srv.cancelBase()
	peer := Peer{Interface: "mc-test", Addr: netip.MustParseAddr("10.0.0.5"), MAC: mustMAC("52:54:00:00:00:0a")}
	for _, s := range []struct{ method, target, header string }{
		{"GET", "/latest/meta-data/", ""},
		{"GET", "/2009-04-04/meta-data/public-keys/0/openssh-key", ""},
		{"PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 21600"},
		{"GET", "/openstack/latest/network_data.json", ""},
		{"GET", "/computeMetadata/v1/instance/?recursive=true&alt=text", "Metadata-Flavor: Google"},
		{"GET", "/computeMetadata/v1/instance/id?wait_for_change=true&last_etag=x", "Metadata-Flavor: Google"},
		{"HEAD", "/latest/user-data", "X-aws-ec2-metadata-token: AAAA"},
	} {
		f.Add(s.method, s.target, s.header)
	}
	allowed := map[int]bool{200: true, 301: true, 400: true, 401: true, 403: true, 404: true, 405: true, 500: true}
	f.Fuzz(func(t *testing.T, method, target, header string) {
		if _, err := url.ParseRequestURI(target); err != nil || !validMethod(method) {
			return
		}
		var ctx fasthttp.RequestCtx
		pc := &peerConn{Conn: nopConn{}, resolver: PeerResolverFunc(func(net.Conn) (Peer, error) { return peer, nil })}
		ctx.Init2(pc, nil, false)
		ctx.Request.Header.SetMethod(method)
		ctx.Request.Header.SetRequestURI(target)
		if k, v, ok := strings.Cut(header, ":"); ok {
			k = strings.TrimSpace(k)
			if k != "" && !strings.ContainsAny(k, " \r\n") {
				ctx.Request.Header.Set(k, strings.TrimSpace(v))
			}
		}
		srv.handle(&ctx)
		code, body := ctx.Response.StatusCode(), string(ctx.Response.Body())
		if !allowed[code] {
			t.Fatalf("%s %s: status %d", method, target, code)
		}
		if strings.Contains(body, idB) || strings.Contains(body, "10.0.0.6") {
			t.Fatalf("%s %s leaked B's data to A: %q", method, target, body)
		}
	})
}

func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for _, r := range m {
		if r < 'A' || r > 'Z' {
			return false
		}
	}
	return true
}

// nopConn stands in for a socket in handler-level fuzzing; setting its TTL
// fails, so token requests answer 500, never a token that could leak.
type nopConn struct{ net.Conn }

func (nopConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)} }
