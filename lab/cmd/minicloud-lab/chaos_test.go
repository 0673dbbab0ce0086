package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/minicloud/minicloud/lab/invariants"
)

func TestChaosTableRows(t *testing.T) {
	table := render([]result{
		{scenario: "stop and start a host", target: "host1", recovered: 11400 * time.Millisecond},
		{scenario: "partition", target: "host2", lost: 1, duplicates: 2,
			violations: []string{"one-host: x: running on host1, host2 | again"}, err: errors.New("heal\nfailed")},
	}, 42, 1, time.Minute)
	for _, want := range []string{
		"| stop and start a host | host1 | 11.4s | 0 | 0 | 0 | none |",
		"| partition | host2 | **not recovered** | 1 | 0 | 2 | one-host: x: running on host1, host2 / again; error: heal failed |",
		"--seed 42 --rounds 1",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
}

func TestDuplicatesCountsOnlyOneHostAndUnique(t *testing.T) {
	vs := []invariants.Violation{{Invariant: invariants.OneHost}, {Invariant: invariants.Unique}, {Invariant: invariants.Orphan}, {Invariant: invariants.Settled}}
	if n := duplicates(vs); n != 2 {
		t.Errorf("duplicates = %d, want 2", n)
	}
}
