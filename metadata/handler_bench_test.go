package metadata

import (
	"net"
	"net/netip"
	"testing"

	"github.com/valyala/fasthttp"
)

// BenchmarkServeHTTP measures the handler alone (identity, rate limit,
// tree walk, metrics, headers) for the paths cloud-init asks most, on one
// RequestCtx reused as fasthttp reuses it per connection, so allocs/op are
// the handler's own.
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
	for _, p := range []string{"/latest/meta-data/instance-id", "/latest/meta-data/", "/openstack/latest/meta_data.json", "/computeMetadata/v1/instance/id", "/computeMetadata/v1/instance/?recursive=true"} {
		b.Run(p, func(b *testing.B) {
			var ctx fasthttp.RequestCtx
			ctx.Init2(pc, nil, false)
			ctx.Request.Header.SetMethod("GET")
			ctx.Request.Header.SetRequestURI(p)
			ctx.Request.Header.Set("Metadata-Flavor", "Google")
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				ctx.Response.Reset()
				srv.handle(&ctx)
				if c := ctx.Response.StatusCode(); c != 200 {
					b.Fatal(c)
				}
			}
		})
	}
}
