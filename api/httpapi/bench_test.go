package httpapi_test

import (
	"context"
	"net/http"
	"testing"

	"google.golang.org/grpc"

	"github.com/minicloud/minicloud/api/httpapi"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// BenchmarkGetFlavor is what the HTTP/JSON form costs over gRPC: one
// GetFlavor (a token check and a read of etcd in the API either way)
// called directly over gRPC, and as GET /v1/flavors/{name} on the web
// listener (JSON over HTTPS with keep-alive, then the same gRPC call over
// loopback).
func BenchmarkGetFlavor(b *testing.B) {
	w := startWeb(b, httpapi.Config{})
	w.do(b, w.api.AdminToken, "POST", "/v1/flavors", `{"name":"small","vcpus":1,"memoryMib":512,"diskGib":1}`).want(b, http.StatusOK, "")
	b.Run("grpc", func(b *testing.B) {
		conn, err := grpc.NewClient(w.api.Addr, w.api.DialOptions(w.api.AdminToken)...)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		flavors := minicloudv1.NewFlavorServiceClient(conn)
		for b.Loop() {
			if _, err := flavors.GetFlavor(context.Background(), &minicloudv1.GetFlavorRequest{Name: "small"}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("http", func(b *testing.B) {
		for b.Loop() {
			if r := w.do(b, w.api.AdminToken, "GET", "/v1/flavors/small", ""); r.code != http.StatusOK {
				b.Fatalf("%d %s", r.code, r.raw)
			}
		}
	})
}
