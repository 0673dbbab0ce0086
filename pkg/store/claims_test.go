package store_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

func addClaim(t *testing.T, kv clientv3.KV, host, vmID string, r *minicloudv1.Resources) {
	t.Helper()
	ctx := context.Background()
	for {
		s, err := store.ReadClaimState(ctx, kv, host, vmID)
		if err != nil {
			t.Fatal(err)
		}
		cmps, ops, _, err := store.AddClaimOps(&minicloudv1.Claim{VmId: vmID, Host: host, Resources: r}, s.Alloc, s.AllocModRevision)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			t.Fatal(err)
		}
		if resp.Succeeded {
			return
		}
	}
}

// release removes a claim on its own, retrying when another writer changed
// the host's allocation first, as the write protocols' callers do.
func release(t *testing.T, kv clientv3.KV, host, vmID string) error {
	ctx := context.Background()
	for range 1000 {
		s, err := store.ReadClaimState(ctx, kv, host, vmID)
		if err != nil {
			return err
		}
		if s.Claim == nil {
			return nil
		}
		cmps, ops, err := store.ReleaseClaimOps(s)
		if err != nil {
			return err
		}
		if _, ok, err := store.Commit(ctx, kv, cmps, ops); err != nil || ok {
			return err
		}
	}
	return fmt.Errorf("release of %s/%s kept losing", host, vmID)
}

func alloc(t *testing.T, kv clientv3.KV, host string) *minicloudv1.HostAllocation {
	t.Helper()
	resp, err := kv.Get(context.Background(), store.HostAllocKey(host))
	if err != nil {
		t.Fatal(err)
	}
	a := &minicloudv1.HostAllocation{}
	if len(resp.Kvs) > 0 {
		if err := proto.Unmarshal(resp.Kvs[0].Value, a); err != nil {
			t.Fatal(err)
		}
	}
	return a
}

func res(v int32, m, d int64) *minicloudv1.Resources {
	return &minicloudv1.Resources{Vcpus: v, MemoryMib: m, DiskGib: d}
}

func TestReleaseClaimRestoresAllocationAndIsIdempotent(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	addClaim(t, cli, "h1", "vm1", res(2, 2048, 20))
	addClaim(t, cli, "h1", "vm2", res(1, 512, 5))
	if a := alloc(t, cli, "h1"); !proto.Equal(a, &minicloudv1.HostAllocation{Allocated: res(3, 2560, 25), VmCount: 2}) {
		t.Fatalf("after two claims: %v", a)
	}
	if err := release(t, cli, "h1", "vm1"); err != nil {
		t.Fatal(err)
	}
	want := &minicloudv1.HostAllocation{Allocated: res(1, 512, 5), VmCount: 1}
	if a := alloc(t, cli, "h1"); !proto.Equal(a, want) {
		t.Fatalf("after release: %v, want %v", a, want)
	}
	rev := mustRev(t, cli)
	for _, c := range []struct{ host, vm string }{{"h1", "vm1"}, {"h1", "never"}, {"nohost", "vm1"}} {
		if err := release(t, cli, c.host, c.vm); err != nil {
			t.Fatalf("release of missing claim %s/%s: %v", c.host, c.vm, err)
		}
	}
	if r := mustRev(t, cli); r != rev {
		t.Fatalf("releasing missing claims wrote to etcd (revision %d -> %d)", rev, r)
	}
	if resp, _ := cli.Get(ctx, store.ClaimKey("h1", "vm1")); len(resp.Kvs) != 0 {
		t.Fatal("claim still present after release")
	}
}

func mustRev(t *testing.T, cli *clientv3.Client) int64 {
	resp, err := cli.Get(context.Background(), "probe")
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// TestReleaseClaimOpsFoldIntoCallerTxn is how the API deletes a VM: the
// release rides in its own transaction, and a stale read makes the whole
// transaction fail rather than lose an allocation change.
func TestReleaseClaimOpsFoldIntoCallerTxn(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	addClaim(t, cli, "h1", "vm1", res(1, 1024, 10))
	s, err := store.ReadClaimState(ctx, cli, "h1", "vm1")
	if err != nil {
		t.Fatal(err)
	}
	cmps, ops, err := store.ReleaseClaimOps(s)
	if err != nil {
		t.Fatal(err)
	}
	// Another writer changes the host's allocation after the read.
	addClaim(t, cli, "h1", "vm2", res(1, 1024, 10))
	ops = append(ops, clientv3.OpDelete(store.VMSpecKey("vm1")))
	resp, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Succeeded {
		t.Fatal("release built from a stale read committed")
	}
	// Re-read and fold again: now it commits.
	s, _ = store.ReadClaimState(ctx, cli, "h1", "vm1")
	cmps, ops, _ = store.ReleaseClaimOps(s)
	resp, err = cli.Txn(ctx).If(cmps...).Then(append(ops, clientv3.OpDelete(store.VMSpecKey("vm1")))...).Commit()
	if err != nil || !resp.Succeeded {
		t.Fatalf("release after re-read: succeeded=%v err=%v", resp != nil && resp.Succeeded, err)
	}
	if a := alloc(t, cli, "h1"); !proto.Equal(a, &minicloudv1.HostAllocation{Allocated: res(1, 1024, 10), VmCount: 1}) {
		t.Fatalf("allocation after release: %v", a)
	}
	// Without a claim the ops are empty and the compare says "still no claim".
	s, _ = store.ReadClaimState(ctx, cli, "h1", "vm1")
	cmps, ops, _ = store.ReleaseClaimOps(s)
	if len(ops) != 0 || len(cmps) != 1 {
		t.Fatalf("no claim: %d compares, %d ops", len(cmps), len(ops))
	}
}

func TestConcurrentReleasesAndClaimsKeepTheSum(t *testing.T) {
	_, cli := etcdtest.Start(t)
	const n = 20
	for i := range n {
		addClaim(t, cli, "h1", fmt.Sprintf("old%d", i), res(1, 100, 1))
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() { errs <- release(t, cli, "h1", fmt.Sprintf("old%d", i)) })
		wg.Go(func() { addClaim(t, cli, "h1", fmt.Sprintf("new%d", i), res(2, 200, 2)) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("release gave up under contention: %v", err)
		}
	}
	want := &minicloudv1.HostAllocation{Allocated: res(2*n, 200*n, 2*n), VmCount: n}
	if a := alloc(t, cli, "h1"); !proto.Equal(a, want) {
		t.Fatalf("allocation %v, want %v", a, want)
	}
}

func TestAddClaimRefusesDoubleClaim(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	addClaim(t, cli, "h1", "vm1", res(1, 1, 1))
	s, _ := store.ReadClaimState(ctx, cli, "h1", "vm1")
	cmps, ops, _, err := store.AddClaimOps(&minicloudv1.Claim{VmId: "vm1", Host: "h1", Resources: res(1, 1, 1)}, s.Alloc, s.AllocModRevision)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil || resp.Succeeded {
		t.Fatalf("second claim of the same vm on the same host: succeeded=%v err=%v", resp != nil && resp.Succeeded, err)
	}
	if _, _, _, err := store.AddClaimOps(&minicloudv1.Claim{VmId: "vm1"}, nil, 0); !errdefs.IsInvalid(err) {
		t.Fatalf("claim without host: %v, want invalid", err)
	}
}
