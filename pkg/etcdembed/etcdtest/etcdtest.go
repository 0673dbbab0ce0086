// Package etcdtest starts a real embedded etcd for tests.
package etcdtest

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/etcdembed"
)

// Start starts a real embedded etcd in t's temp dir on free loopback
// ports and returns a client; both are closed when the test ends.
func Start(t testing.TB) (*etcdembed.Server, *clientv3.Client) {
	t.Helper()
	s, err := etcdembed.Start(context.Background(), etcdembed.Config{
		Dir:        t.TempDir(),
		ClientAddr: "127.0.0.1:0",
		PeerAddr:   "127.0.0.1:0",
		Quiet:      true,
	})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(s.Close)
	c, err := s.Client()
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return s, c
}
