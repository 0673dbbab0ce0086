package lifecycle_test

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/docsync"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// want is the transition table written out a second time, as a grid per
// actor (rows: from, columns: to, in the order of lifecycle.Phases; x:
// allowed), so that a change to lifecycle.Transitions has to be made twice,
// on purpose. Every (from, to, actor) triple is checked.
var want = map[lifecycle.Actor][]string{
	//                   to: - P S C R T E D
	lifecycle.API: {
		/* none      */ ". x . . . . . .",
		/* PENDING   */ "x . . . . . . .",
		/* SCHEDULED */ "x x . . . . . x",
		/* CREATING  */ "x x . . . . . x",
		/* RUNNING   */ "x x . . . . . x",
		/* STOPPED   */ "x x . . . . . x",
		/* ERROR     */ "x x . . . . . x",
		/* DELETING  */ "x . . . . . . x",
	},
	lifecycle.Scheduler: {
		/* none      */ ". . . . . . . .",
		/* PENDING   */ ". . x . . . x .",
		/* SCHEDULED */ ". x x . . . . .",
		/* CREATING  */ ". x . x . . . .",
		/* RUNNING   */ ". x . . x . . .",
		/* STOPPED   */ ". x . . . x . .",
		/* ERROR     */ ". x . . . . x .",
		/* DELETING  */ "x . . . . . . x",
	},
	lifecycle.Agent: {
		/* none      */ ". . . . . . . .",
		/* PENDING   */ ". . . . . . . .",
		/* SCHEDULED */ ". . . x x x x .",
		/* CREATING  */ ". . . x x x x .",
		/* RUNNING   */ ". . . . x x x .",
		/* STOPPED   */ ". . . . x x x .",
		/* ERROR     */ ". . . . x x x .",
		/* DELETING  */ "x . . . . . . .",
	},
}

func TestTransitionTableEveryPair(t *testing.T) {
	for _, by := range lifecycle.Actors {
		grid := want[by]
		if len(grid) != len(lifecycle.Phases) {
			t.Fatalf("%s: %d rows, want %d", by, len(grid), len(lifecycle.Phases))
		}
		for i, from := range lifecycle.Phases {
			cells := strings.Fields(grid[i])
			if len(cells) != len(lifecycle.Phases) {
				t.Fatalf("%s row %s: %d cells", by, lifecycle.PhaseName(from), len(cells))
			}
			for j, to := range lifecycle.Phases {
				exp := cells[j] == "x"
				if got := lifecycle.Allowed(from, to, by); got != exp {
					t.Errorf("Allowed(%s -> %s by %s) = %v, want %v", lifecycle.PhaseName(from), lifecycle.PhaseName(to), by, got, exp)
				}
				err := lifecycle.Check(from, to, by)
				if (err == nil) != exp {
					t.Errorf("Check(%s -> %s by %s) = %v", lifecycle.PhaseName(from), lifecycle.PhaseName(to), by, err)
				}
				if err != nil && !strings.Contains(err.Error(), lifecycle.PhaseName(from)+" to "+lifecycle.PhaseName(to)) {
					t.Errorf("error %q does not name the transition", err)
				}
			}
		}
	}
	seen := map[string]bool{}
	for _, tr := range lifecycle.Transitions {
		k := tr.From.String() + tr.To.String() + tr.By.String()
		if seen[k] {
			t.Errorf("duplicate row %s -> %s by %s", tr.From, tr.To, tr.By)
		}
		seen[k] = true
		if tr.Why == "" {
			t.Errorf("row %s -> %s by %s says nothing about when", tr.From, tr.To, tr.By)
		}
	}
}

// TestPhasesMatchProto: every phase of the proto enum is in the table's
// phase list and the other way round.
func TestPhasesMatchProto(t *testing.T) {
	if len(lifecycle.Phases) != len(minicloudv1.VMPhase_name) {
		t.Fatalf("lifecycle knows %d phases, the proto enum has %d", len(lifecycle.Phases), len(minicloudv1.VMPhase_name))
	}
	for _, p := range lifecycle.Phases {
		if _, ok := minicloudv1.VMPhase_name[int32(p)]; !ok {
			t.Errorf("phase %d is not in the proto enum", p)
		}
	}
	// Every phase but None is reachable and every phase but None can be left.
	for _, p := range lifecycle.Phases[1:] {
		in, out := false, false
		for _, tr := range lifecycle.Transitions {
			in = in || (tr.To == p && tr.From != p)
			out = out || (tr.From == p && tr.To != p)
		}
		if !in || !out {
			t.Errorf("phase %s: reachable=%v leavable=%v", lifecycle.PhaseName(p), in, out)
		}
	}
}

// TestDocTable: docs/architecture.md shows lifecycle.MarkdownTable between
// its markers.
func TestDocTable(t *testing.T) {
	docsync.Check(t, "../../docs/architecture.md", "lifecycle table", lifecycle.MarkdownTable())
}

func TestSetCondition(t *testing.T) {
	t0, t1 := time.Unix(100, 0), time.Unix(200, 0)
	st := &minicloudv1.VMStatus{}
	if !lifecycle.SetCondition(st, lifecycle.ConditionDiskReady, true, "A", "a", t0) {
		t.Fatal("adding a true condition is a flip")
	}
	if lifecycle.SetCondition(st, lifecycle.ConditionNetworkReady, false, "B", "", t0) {
		t.Fatal("adding a false condition is no flip")
	}
	if lifecycle.SetCondition(st, lifecycle.ConditionDiskReady, true, "A2", "a2", t1) {
		t.Fatal("same status, new reason: no flip")
	}
	c := st.Conditions[0]
	if c.Reason != "A2" || c.Message != "a2" || !c.LastTransitionTime.AsTime().Equal(t0) {
		t.Fatalf("after a reason change: %v (the transition time must stay)", c)
	}
	if !lifecycle.SetCondition(st, lifecycle.ConditionDiskReady, false, "C", "", t1) || !st.Conditions[0].LastTransitionTime.AsTime().Equal(t1) {
		t.Fatalf("flip: %v", st.Conditions[0])
	}
	if len(st.Conditions) != 2 {
		t.Fatalf("%d conditions, want 2", len(st.Conditions))
	}
	lifecycle.SetCondition(st, lifecycle.ConditionNetworkReady, true, "D", "", t1)
	if lifecycle.ConditionTrue(st, lifecycle.ConditionDiskReady) || !lifecycle.ConditionTrue(st, lifecycle.ConditionNetworkReady) ||
		lifecycle.ConditionTrue(st, lifecycle.ConditionGuestReady) || lifecycle.ConditionTrue(nil, lifecycle.ConditionGuestReady) {
		t.Fatalf("ConditionTrue disagrees with %v (an absent condition, or a nil status, is false)", st.Conditions)
	}
}

func TestMergeHostStatus(t *testing.T) {
	st := &minicloudv1.VMStatus{
		Phase: lifecycle.Scheduled, Host: "h1", ScheduleAttempts: 2, TriedHosts: []string{"h0"}, HostDown: true,
		Addresses: []*minicloudv1.VMAddress{{Ip: "10.0.0.2"}},
	}
	observed := &minicloudv1.VMStatus{
		Phase: lifecycle.Running, Reason: "Running", Message: "m", Hypervisor: "tcg",
		ObservedRebootGeneration: 3, ObservedResourceVersion: 7,
		Conditions: []*minicloudv1.Condition{{Type: lifecycle.ConditionDomainRunning, Status: true}},
		// Not the host's to set: ignored.
		Host: "evil", ScheduleAttempts: 99, HostDown: false,
	}
	lifecycle.MergeHostStatus(st, observed)
	exp := &minicloudv1.VMStatus{
		Phase: lifecycle.Running, Host: "h1", ScheduleAttempts: 2, TriedHosts: []string{"h0"}, HostDown: true,
		Addresses: []*minicloudv1.VMAddress{{Ip: "10.0.0.2"}},
		Reason:    "Running", Message: "m", Hypervisor: "tcg", ObservedRebootGeneration: 3, ObservedResourceVersion: 7,
		Conditions: []*minicloudv1.Condition{{Type: lifecycle.ConditionDomainRunning, Status: true}},
	}
	if !proto.Equal(st, exp) {
		t.Fatalf("merged %v\nwant %v", st, exp)
	}
	observed.Conditions[0].Status = false
	if !st.Conditions[0].Status {
		t.Fatal("merge shares conditions with its source")
	}
	// An unspecified phase keeps the phase.
	lifecycle.MergeHostStatus(st, &minicloudv1.VMStatus{Reason: "x"})
	if st.Phase != lifecycle.Running || st.Reason != "x" || len(st.Conditions) != 0 {
		t.Fatalf("merge without phase: %v", st)
	}
}

func TestSameHostStatus(t *testing.T) {
	now := time.Now()
	a := &minicloudv1.VMStatus{Phase: lifecycle.Running, Host: "h1"}
	lifecycle.SetCondition(a, lifecycle.ConditionDomainRunning, true, "Running", "", now)
	b := proto.CloneOf(a)
	b.Host, b.HostDown, b.ScheduleAttempts = "h2", true, 4
	b.Conditions[0].LastTransitionTime = nil
	if !lifecycle.SameHostStatus(a, b) {
		t.Fatal("statuses that differ only in fields the host does not own, or in transition times, differ")
	}
	for name, change := range map[string]func(*minicloudv1.VMStatus){
		"phase":      func(s *minicloudv1.VMStatus) { s.Phase = lifecycle.Stopped },
		"reason":     func(s *minicloudv1.VMStatus) { s.Reason = "x" },
		"message":    func(s *minicloudv1.VMStatus) { s.Message = "x" },
		"hypervisor": func(s *minicloudv1.VMStatus) { s.Hypervisor = "kvm" },
		"reboot":     func(s *minicloudv1.VMStatus) { s.ObservedRebootGeneration = 1 },
		"rv":         func(s *minicloudv1.VMStatus) { s.ObservedResourceVersion = 1 },
		"condition":  func(s *minicloudv1.VMStatus) { s.Conditions[0].Message = "x" },
		"conditions": func(s *minicloudv1.VMStatus) { s.Conditions = nil },
	} {
		c := proto.CloneOf(a)
		change(c)
		if lifecycle.SameHostStatus(a, c) {
			t.Errorf("a change of %s went unnoticed", name)
		}
	}
	if !lifecycle.SameHostStatus(nil, nil) || lifecycle.SameHostStatus(a, nil) {
		t.Fatal("nil handling")
	}
}
