package metadata

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
)

// BenchmarkServeHTTP measures the handler alone (identity, rate limit,
// tree walk, metrics, headers) for the paths cloud-init asks most. The
// writer keeps one header map and discards the body, as net/http's does
// per request, so allocs/op are the handler's own and not a recorder's.
func BenchmarkServeHTTP(b *testing.B) {
	a := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	a.UserData = []byte("#cloud-config\n")
	dir := NewDirectory()
	if err := dir.Set([]*Instance{a}); err != nil {
		b.Fatal(err)
	}
	srv, err := NewServer(dir, Options{RateLimit: 1e9, RateBurst: 1 << 30})
	if err != nil {
		b.Fatal(err)
	}
	peer := Peer{Interface: "mc-test", Addr: netip.MustParseAddr("10.0.0.5"), MAC: mustMAC("52:54:00:00:00:0a")}
	pc := &peerConn{Conn: nopConn{}, resolver: PeerResolverFunc(func(net.Conn) (Peer, error) { return peer, nil })}
	ctx := context.WithValue(context.Background(), peerConnKey{}, pc)
	for _, p := range []string{"/latest/meta-data/instance-id", "/latest/meta-data/", "/openstack/latest/meta_data.json", "/computeMetadata/v1/instance/id", "/computeMetadata/v1/instance/?recursive=true"} {
		b.Run(p, func(b *testing.B) {
			req := httptest.NewRequest("GET", p, nil).WithContext(ctx)
			req.Header.Set("Metadata-Flavor", "Google")
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				clear(w.h)
				w.code = 0
				srv.ServeHTTP(w, req)
				if w.code != 200 {
					b.Fatal(w.code)
				}
			}
		})
	}
}

// discardWriter is the cheapest ResponseWriter: it remembers the status
// and drops the body.
type discardWriter struct {
	h    http.Header
	code int
}

func (w *discardWriter) Header() http.Header { return w.h }

func (w *discardWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
}

func (w *discardWriter) Write(b []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return len(b), nil
}
