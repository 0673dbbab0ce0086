package server_test

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestCreateCacheBehindEtcd: creates take the image, flavor and network
// from the create cache; when the cache is behind etcd (its watch stalled
// while another replica, straight in etcd here, changed a flavor and
// deleted a flavor and a network), the create's compares fail and it tries
// again with an etcd read: it uses the flavor as it is now, or is refused
// with NotFound having written nothing, never a VM built from what changed.
func TestCreateCacheBehindEtcd(t *testing.T) {
	defer apiserver.SetStallableWatches()()
	e := newEnv(t)
	e.seed()
	if _, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "second", Cidr: "10.98.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	e.createVM("warm") // starts the cache
	deadline := time.Now().Add(10 * time.Second)
	for !e.srv.CreateCacheSynced() {
		if time.Now().After(deadline) {
			t.Fatal("create cache not synced after 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	hits := e.srv.CreateCacheHits()
	before := e.rev()
	e.createVM("cached", func(r *minicloudv1.CreateVMRequest) { r.Spec.Networks = []string{"default", "second"} })
	if got := e.srv.CreateCacheHits(); got != hits+1 {
		t.Fatalf("create cache answered %d creates, want 1", got-hits)
	}
	if n := e.writesSince(before); n != 1 {
		t.Fatalf("a create from the cache took %d etcd revisions, want 1", n)
	}

	resume := e.srv.StallCreateCacheWatch()
	defer func() { resume() }()
	// Another replica gives flavor small 2 vCPUs and deletes flavor tiny
	// and network second; this replica's cache does not hear of it.
	resp, err := e.etcd.Get(ctx(t), store.FlavorKey("small"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("read flavor small: %v", err)
	}
	small := &minicloudv1.Flavor{}
	if err := store.Decode(resp.Kvs[0], small); err != nil {
		t.Fatal(err)
	}
	small.Vcpus = 2
	v, _ := store.Marshal(small)
	if _, err := e.etcd.Put(ctx(t), store.FlavorKey("small"), v); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{store.FlavorKey("tiny"), store.NetworkKey("default", "second")} {
		if _, err := e.etcd.Delete(ctx(t), key); err != nil {
			t.Fatal(err)
		}
	}

	hits = e.srv.CreateCacheHits()
	vm := e.createVM("changed-flavor")
	if got := vm.GetSpec().GetResources().GetVcpus(); got != 2 {
		t.Fatalf("vm made from a stale flavor: %d vCPUs, want 2", got)
	}
	before = e.rev()
	dump := e.dump(t)
	_, err = e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "gone-flavor", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}})
	wantCode(t, err, codes.NotFound, "flavor tiny")
	_, err = e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "gone-network", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", Networks: []string{"second"}}})
	wantCode(t, err, codes.NotFound, "network second")
	if n := e.writesSince(before); n != 0 {
		t.Fatalf("refused creates wrote %d etcd revisions", n)
	}
	e.wantUnchanged(t, dump)
	if got := e.srv.CreateCacheHits(); got != hits+3 {
		t.Fatalf("create cache answered %d of the 3 creates, want all (then the read)", got-hits)
	}
	e.checkConsistent()
}
