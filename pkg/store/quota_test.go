package store_test

import (
	"context"
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestChargedCommitsOnlyAfterTheChargeBeforeIt: a charge built on
// Charged (the usage as a charge still in flight leaves it) fails while
// that charge has not committed, commits once it has, and fails again if
// anything else wrote the usage in between; the record ends as the sum
// of the charges that committed.
func TestChargedCommitsOnlyAfterTheChargeBeforeIt(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	vm := &minicloudv1.QuotaUsage{Instances: 1, Vcpus: 2}
	commit := func(s store.UsageState, next *minicloudv1.QuotaUsage) bool {
		t.Helper()
		cmps, ops, err := store.ChargeOps(s, next)
		if err != nil {
			t.Fatal(err)
		}
		_, ok, err := store.Commit(ctx, cli, cmps, ops)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	charged := func(s store.UsageState, next *minicloudv1.QuotaUsage) store.UsageState {
		t.Helper()
		s, err := s.Charged(next)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}

	s0, err := store.ReadCountedUsage(ctx, cli, "p")
	if err != nil {
		t.Fatal(err)
	}
	u1 := store.AddUsage(s0.Usage, vm, 1)
	s1 := charged(s0, u1)
	u2 := store.AddUsage(u1, vm, 1)
	if commit(s1, u2) {
		t.Fatal("the second charge committed before the first")
	}
	if !commit(s0, u1) {
		t.Fatal("the first charge failed")
	}
	if !commit(s1, u2) {
		t.Fatal("the second charge failed after the first committed")
	}

	// Another writer (a delete elsewhere) moves the usage: a charge built
	// on what this one last wrote fails.
	s2 := charged(s1, u2)
	u3 := store.AddUsage(u2, vm, 1)
	if _, err := cli.Put(ctx, store.QuotaUsageKey("p"), mustMarshal(t, store.AddUsage(u2, vm, -1))); err != nil {
		t.Fatal(err)
	}
	if commit(s2, u3) {
		t.Fatal("a charge committed over a usage someone else wrote")
	}
	got, err := store.ReadUsage(ctx, cli, "p")
	if err != nil {
		t.Fatal(err)
	}
	if got.Usage.GetInstances() != 1 || got.Usage.GetVcpus() != 2 {
		t.Fatalf("usage %v, want the other writer's", got.Usage)
	}
}

func mustMarshal(t *testing.T, u *minicloudv1.QuotaUsage) string {
	t.Helper()
	v, err := store.Marshal(u)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
