package etcdembed

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
)

// The retry in Start relies on a busy port surfacing as EADDRINUSE through
// etcd's error chain.
func TestBusyPortIsAddrInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = start(context.Background(), Config{Dir: t.TempDir(), ClientAddr: l.Addr().String(), PeerAddr: "127.0.0.1:0", Quiet: true})
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("start on a busy port: %v; want an error wrapping EADDRINUSE", err)
	}
}
