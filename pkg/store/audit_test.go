package store_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestAuditAppendsGroupCommitted: many concurrent appends are all stored,
// each once and intact, in fewer transactions than records, and each
// Append returns only once its record can be read back.
func TestAuditAppendsGroupCommitted(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	log := store.NewAuditLog(cli)
	before, err := cli.Get(ctx, "rev")
	if err != nil {
		t.Fatal(err)
	}
	const n = 300 // more than one batch holds
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := &minicloudv1.AuditRecord{Time: timestamppb.New(time.Now()), Principal: "user alice", Rpc: "VMService/CreateVM", Object: fmt.Sprintf("vm-%03d", i), Code: "OK"}
			if err := log.Append(ctx, rec); err != nil {
				t.Errorf("append %d: %v", i, err)
				return
			}
			got, err := store.ListAudit(ctx, cli, "", n, n)
			if err != nil {
				t.Errorf("list: %v", err)
				return
			}
			for _, r := range got {
				if r.GetObject() == rec.Object {
					return
				}
			}
			t.Errorf("record of vm-%03d not readable after its Append returned", i)
		}()
	}
	wg.Wait()
	got, err := store.ListAudit(ctx, cli, "", 2*n, 2*n)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, r := range got {
		seen[r.GetObject()]++
		if r.GetPrincipal() != "user alice" || r.GetRpc() != "VMService/CreateVM" || r.GetCode() != "OK" {
			t.Fatalf("record %v not as written", r)
		}
	}
	for i := range n {
		if c := seen[fmt.Sprintf("vm-%03d", i)]; c != 1 {
			t.Errorf("vm-%03d recorded %d times, want once", i, c)
		}
	}
	after, err := cli.Get(ctx, "rev")
	if err != nil {
		t.Fatal(err)
	}
	// One revision per transaction (the lease grant writes none).
	if txns := after.Header.Revision - before.Header.Revision; txns >= n {
		t.Errorf("%d records took %d transactions; want them grouped", n, txns)
	}
}

// TestAuditAppendFailsWhenEtcdDoes: a record that cannot be written is
// reported to its caller, not lost silently.
func TestAuditAppendFailsWhenEtcdDoes(t *testing.T) {
	e, _ := etcdtest.Start(t)
	cli, err := e.Client()
	if err != nil {
		t.Fatal(err)
	}
	log := store.NewAuditLog(cli)
	ctx := context.Background()
	rec := &minicloudv1.AuditRecord{Time: timestamppb.Now(), Principal: "user alice", Rpc: "VMService/DeleteVM", Object: "web1", Code: "OK"}
	if err := log.Append(ctx, rec); err != nil {
		t.Fatal(err)
	}
	cli.Close()
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := log.Append(cctx, rec); err == nil || cctx.Err() != nil {
		t.Fatalf("append through a closed client: %v (want its error, before the deadline)", err)
	}
}
