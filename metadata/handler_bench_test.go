package metadata

import (
	"context"
	"net"
	"net/http/httptest"
	"net/netip"
	"testing"
)

// BenchmarkServeHTTP measures the handler alone (identity, rate limit,
// tree walk, metrics) for the paths cloud-init asks most.
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
	for _, p := range []string{"/latest/meta-data/instance-id", "/latest/meta-data/", "/openstack/latest/meta_data.json"} {
		b.Run(p, func(b *testing.B) {
			req := httptest.NewRequest("GET", p, nil).WithContext(ctx)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				rec := httptest.NewRecorder()
				srv.ServeHTTP(rec, req)
				if rec.Code != 200 {
					b.Fatal(rec.Code)
				}
			}
		})
	}
}
