package snapshot

import (
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/placement"
)

// These tests feed key changes straight into the view (as the watch does)
// to pin down the ordering rules; the watches themselves run against real
// etcd in the scheduler package's tests.

func kv(key string, m proto.Message, rev int64) *mvccpb.KeyValue {
	var b []byte
	if m != nil {
		b, _ = proto.Marshal(m)
	}
	return &mvccpb.KeyValue{Key: []byte(key), Value: b, ModRevision: rev, CreateRevision: rev}
}

func newTestSnapshot(alive *[]string) *Snapshot {
	return New(nil, slog.New(slog.NewTextHandler(io.Discard, nil)), func(h string) { *alive = append(*alive, h) })
}

func alloc(mem int64, n int32) *minicloudv1.HostAllocation {
	return &minicloudv1.HostAllocation{Allocated: &minicloudv1.Resources{MemoryMib: mem}, VmCount: n}
}

func TestViewOnlyMovesForward(t *testing.T) {
	var changed []string
	s := newTestSnapshot(&changed)
	s.apply(mvccpb.PUT, kv(store.HostSpecKey("h1"), &minicloudv1.Host{Capacity: &minicloudv1.Resources{Vcpus: 4, MemoryMib: 4096}}, 1))
	s.apply(mvccpb.PUT, kv(store.HostAllocKey("h1"), alloc(1024, 1), 5))
	if h, _ := s.Host("h1"); h.Allocated.MemoryMiB != 1024 || h.Up {
		t.Fatalf("after alloc event: %+v", h)
	}

	// This replica commits at revision 10; the watch then delivers the
	// older revision 7 (another writer) and the echo of 10: neither may
	// roll the view back.
	r := Reservation{Host: "h1"}
	s.Confirm(r, alloc(3072, 3), &minicloudv1.Claim{VmId: "vm3", Host: "h1", Project: "p", ServerGroup: "g"}, 10)
	s.apply(mvccpb.PUT, kv(store.HostAllocKey("h1"), alloc(2048, 2), 7))
	s.apply(mvccpb.PUT, kv(store.HostAllocKey("h1"), alloc(3072, 3), 10))
	if h, _ := s.Host("h1"); h.Allocated.MemoryMiB != 3072 || h.VMCount != 3 {
		t.Fatalf("stale event rolled the view back: %+v", h)
	}
	if s.alloc["h1"].modRev != 10 {
		t.Fatalf("alloc mod revision %d, want 10", s.alloc["h1"].modRev)
	}
	// The claim echo does not count the group member twice.
	s.apply(mvccpb.PUT, kv(store.ClaimKey("h1", "vm3"), &minicloudv1.Claim{VmId: "vm3", Host: "h1", Project: "p", ServerGroup: "g"}, 10))
	if n := s.cluster.Groups[placement.GroupKey("p", "g")]["h1"]; n != 1 {
		t.Fatalf("group p/g has %d members on h1, want 1", n)
	}
	// A delete older than the claim (of an earlier incarnation) is ignored,
	// a newer one removes it.
	s.apply(mvccpb.DELETE, kv(store.ClaimKey("h1", "vm3"), nil, 9))
	if len(s.cluster.Groups) != 1 {
		t.Fatal("an old delete removed a newer claim")
	}
	s.apply(mvccpb.DELETE, kv(store.ClaimKey("h1", "vm3"), nil, 11))
	if len(s.cluster.Groups) != 0 {
		t.Fatalf("groups after delete: %v", s.cluster.Groups)
	}

	// Liveness flips are reported once each.
	s.apply(mvccpb.PUT, kv(store.HostAliveKey("h1"), nil, 12))
	if _, flipped := s.apply(mvccpb.PUT, kv(store.HostAliveKey("h1"), nil, 13)); flipped {
		t.Fatal("a heartbeat rewrite was reported as a liveness change")
	}
	if h, _ := s.Host("h1"); !h.Up {
		t.Fatal("host not up after its alive key appeared")
	}
	if _, flipped := s.apply(mvccpb.DELETE, kv(store.HostAliveKey("h1"), nil, 14)); !flipped || s.Alive("h1") {
		t.Fatal("lease expiry not applied")
	}
}

func TestRefreshHostReplacesClaimsAndAllocation(t *testing.T) {
	var changed []string
	s := newTestSnapshot(&changed)
	s.apply(mvccpb.PUT, kv(store.HostSpecKey("h1"), &minicloudv1.Host{Capacity: &minicloudv1.Resources{MemoryMib: 4096}}, 1))
	s.apply(mvccpb.PUT, kv(store.HostAllocKey("h1"), alloc(1024, 1), 2))
	s.apply(mvccpb.PUT, kv(store.ClaimKey("h1", "gone"), &minicloudv1.Claim{VmId: "gone", Project: "p", ServerGroup: "g"}, 2))
	// etcd at revision 20: "gone" was released, "new" (group g) claimed.
	s.RefreshHost("h1", kv(store.HostAllocKey("h1"), alloc(2048, 1), 19),
		[]*mvccpb.KeyValue{kv(store.ClaimKey("h1", "new"), &minicloudv1.Claim{VmId: "new", Project: "p", ServerGroup: "g2"}, 19)}, 20)
	if h, _ := s.Host("h1"); h.Allocated.MemoryMiB != 2048 {
		t.Fatalf("allocation not refreshed: %+v", h)
	}
	if _, ok := s.cluster.Groups["p/g"]; ok {
		t.Fatal("released claim still counted")
	}
	if s.cluster.Groups["p/g2"]["h1"] != 1 {
		t.Fatalf("new claim not counted: %v", s.cluster.Groups)
	}
}

// TestReserveStacksPendingAndExcludesBusyGroups: a reservation counts on
// its host until Confirm or Abort, so the next decision stacks on it; a
// request that only this replica's pending reservations keep out is
// retryable, and a server group has one member in flight at a time.
func TestReserveStacksPendingAndExcludesBusyGroups(t *testing.T) {
	var changed []string
	s := newTestSnapshot(&changed)
	for _, h := range []string{"h1", "h2"} {
		s.apply(mvccpb.PUT, kv(store.HostSpecKey(h), &minicloudv1.Host{Capacity: &minicloudv1.Resources{Vcpus: 4, MemoryMib: 4096}}, 1))
		s.apply(mvccpb.PUT, kv(store.HostAliveKey(h), nil, 1))
	}
	p, _ := placement.NewPolicy(placement.Spread)
	rng := rand.New(rand.NewPCG(1, 1))
	half := placement.Resources{VCPUs: 1, MemoryMiB: 2048}
	req := &placement.Request{Resources: half, Group: "p/g"}
	r1, err := s.Reserve(req, p, rng)
	if err != nil {
		t.Fatal(err)
	}
	if h, _ := s.Host(r1.Host); h.Allocated != half || h.Pending != half || h.VMCount != 1 {
		t.Fatalf("reserved host %+v, want the reservation counted as pending", h)
	}
	if _, err := s.Reserve(req, p, rng); err != ErrGroupBusy {
		t.Fatalf("second member of a group in flight: %v, want ErrGroupBusy", err)
	}
	var rs []Reservation
	for range 3 {
		r, err := s.Reserve(&placement.Request{Resources: half}, p, rng)
		if err != nil {
			t.Fatalf("stacking on pending reservations: %v", err)
		}
		rs = append(rs, r)
	}
	if rs[0].Host == r1.Host {
		t.Fatalf("spread put the second reservation on %s beside the first: pending not counted", rs[0].Host)
	}
	_, err = s.Reserve(&placement.Request{Resources: half}, p, rng)
	if nvh, ok := err.(*placement.NoValidHostError); !ok || !nvh.Retryable() {
		t.Fatalf("both hosts full with pending reservations: %v, want a retryable NoValidHost", err)
	}
	// An allocation event for the host keeps the pending reservations.
	s.apply(mvccpb.PUT, kv(store.HostAllocKey(r1.Host), alloc(0, 0), 5))
	if h, _ := s.Host(r1.Host); h.Allocated.MemoryMiB != 4096 {
		t.Fatalf("allocation event dropped the pending reservations: %+v", h)
	}
	s.Abort(r1)
	if h, _ := s.Host(r1.Host); h.Allocated.MemoryMiB != 2048 || h.VMCount != 1 {
		t.Fatalf("after Abort: %+v, want one reservation left", h)
	}
	for _, r := range rs {
		s.Abort(r)
	}
	for _, h := range []string{"h1", "h2"} {
		if v, _ := s.Host(h); v.Allocated != (placement.Resources{}) || v.Pending != (placement.Resources{}) || v.VMCount != 0 {
			t.Fatalf("after every Abort: %+v", v)
		}
	}
	if _, err := s.Reserve(req, p, rng); err != nil {
		t.Fatalf("after Abort: %v", err)
	}
}
