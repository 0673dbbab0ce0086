package snapshot

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestWaitAppliedAgainstEtcd: on real etcd, WaitApplied returns only once
// the view holds a change made at or before the revision asked for, also
// when the revision was made by keys no watched prefix sees, and never
// returns for a change the view did not receive.
func TestWaitAppliedAgainstEtcd(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(cli, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	<-s.Synced()

	b, err := proto.Marshal(alloc(512, 1))
	if err != nil {
		t.Fatal(err)
	}
	put, err := cli.Put(ctx, store.HostAllocKey("h1"), string(b))
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	if err := s.WaitApplied(wctx, put.Header.Revision); err != nil {
		t.Fatalf("WaitApplied(%d): %v", put.Header.Revision, err)
	}
	s.mu.Lock()
	got := s.alloc["h1"].modRev
	s.mu.Unlock()
	if got != put.Header.Revision {
		t.Fatalf("after WaitApplied the view has h1's allocation at revision %d, want %d", got, put.Header.Revision)
	}

	// A write outside every watched prefix moves etcd's revision but
	// leaves nothing for the view to wait for.
	other, err := cli.Put(ctx, store.VMSpecKey("unwatched"), "x")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.WaitApplied(wctx, other.Header.Revision); err != nil {
		t.Fatalf("WaitApplied(%d) for an unwatched write: %v", other.Header.Revision, err)
	}

	// A view that stops following etcd never catches up with a later
	// change: the deadline ends the wait.
	cancel()
	<-done
	done <- nil
	later, err := cli.Put(context.Background(), store.HostAllocKey("h1"), string(b))
	if err != nil {
		t.Fatal(err)
	}
	short, scancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer scancel()
	if err := s.WaitApplied(short, later.Header.Revision); err == nil {
		t.Fatal("WaitApplied returned nil for a change the stopped view never saw")
	}
}
