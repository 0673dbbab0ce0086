package store_test

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestVNIAllocation takes every VNI of a small range, one transaction each,
// sees the range run out with a clear error, loses a race for a VNI, and
// gets a released VNI back.
func TestVNIAllocation(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	r := store.VNIRange{First: 5000, Last: 5002}
	take := func(id string) (uint32, bool) {
		t.Helper()
		vni, cmp, op, err := store.VNIAllocation(ctx, cli, r, id)
		if err != nil {
			t.Fatalf("allocate for %s: %v", id, err)
		}
		_, ok, err := store.Commit(ctx, cli, []clientv3.Cmp{cmp}, []clientv3.Op{op})
		if err != nil {
			t.Fatal(err)
		}
		return vni, ok
	}
	seen := map[uint32]string{}
	for _, id := range []string{"net-a", "net-b", "net-c"} {
		vni, ok := take(id)
		if !ok || vni < r.First || vni > r.Last || seen[vni] != "" {
			t.Fatalf("%s got VNI %d (committed %v); taken so far %v", id, vni, ok, seen)
		}
		seen[vni] = id
	}
	if _, _, _, err := store.VNIAllocation(ctx, cli, r, "net-d"); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("allocation from a full range: %v, want ResourceExhausted", err)
	}
	// Two writers pick the same free VNI: only one transaction commits.
	var freed uint32
	for vni, id := range seen {
		if id == "net-b" {
			freed = vni
		}
	}
	if _, ok, err := store.Commit(ctx, cli, nil, store.VNIRelease(freed)); err != nil || !ok {
		t.Fatalf("release %d: %v", freed, err)
	}
	v1, c1, o1, err := store.VNIAllocation(ctx, cli, r, "net-e")
	if err != nil {
		t.Fatal(err)
	}
	v2, c2, o2, err := store.VNIAllocation(ctx, cli, r, "net-f")
	if err != nil {
		t.Fatal(err)
	}
	if v1 != freed || v2 != freed {
		t.Fatalf("released VNI %d not offered again: %d, %d", freed, v1, v2)
	}
	if _, ok, _ := store.Commit(ctx, cli, []clientv3.Cmp{c1}, []clientv3.Op{o1}); !ok {
		t.Fatal("first writer lost")
	}
	if _, ok, _ := store.Commit(ctx, cli, []clientv3.Cmp{c2}, []clientv3.Op{o2}); ok {
		t.Fatal("second writer took a VNI already taken")
	}
	resp, err := cli.Get(ctx, store.VNIKey(freed))
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "net-e" {
		t.Fatalf("VNI %d owner: %v %v", freed, resp, err)
	}
	if store.VNIRelease(0) != nil {
		t.Fatal("VNI 0 (a network from before VNIs) must release nothing")
	}
	for _, bad := range []store.VNIRange{{0, 10}, {10, 5}, {1, 1 << 24}} {
		if _, _, _, err := store.VNIAllocation(ctx, cli, bad, "x"); !errdefs.IsInvalid(err) {
			t.Errorf("range %v: %v, want Invalid", bad, err)
		}
	}
}
