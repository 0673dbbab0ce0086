package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"
	"sigs.k8s.io/yaml"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

func fixedNow(t *testing.T, at time.Time) {
	old := now
	now = func() time.Time { return at }
	t.Cleanup(func() { now = old })
}

func testVMs(created time.Time) []*minicloudv1.VM {
	return []*minicloudv1.VM{
		{
			Meta: &minicloudv1.ObjectMeta{Name: "web1", Project: "default", CreateTime: timestamppb.New(created)},
			Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"},
			Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING, Host: "hv1",
				Addresses: []*minicloudv1.VMAddress{{Network: "default", Ip: "10.99.0.2"}, {Network: "db", Ip: "10.100.0.9"}}},
		},
		{
			Meta:   &minicloudv1.ObjectMeta{Name: "a-much-longer-name", Project: "default", CreateTime: timestamppb.New(created.Add(-3 * time.Hour))},
			Spec:   &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"},
			Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_PENDING},
		},
	}
}

func TestVMTable(t *testing.T) {
	at := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	fixedNow(t, at.Add(90*time.Second))
	var buf bytes.Buffer
	if err := vmTable(&buf, testVMs(at), false); err != nil {
		t.Fatal(err)
	}
	want := `NAME                 PHASE     HOST   ADDRESS                IMAGE    FLAVOR   AGE
web1                 RUNNING   hv1    10.99.0.2,10.100.0.9   debian   small    1m
a-much-longer-name   PENDING   -      -                      tiny     tiny     3h
`
	if buf.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", buf.String(), want)
	}
	// Every row splits into the same number of fields, so awk '{print $3}'
	// works even for empty cells.
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if n := len(strings.Fields(line)); n != 7 {
			t.Fatalf("line %q has %d fields", line, n)
		}
	}
}

func TestJSONAndYAMLArePROTOJSON(t *testing.T) {
	at := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	resp := &minicloudv1.ListVMsResponse{Vms: testVMs(at), ResourceVersion: 42}

	var js bytes.Buffer
	if err := printMessage(&js, formatJSON, resp, nil); err != nil {
		t.Fatal(err)
	}
	var decoded struct {
		Vms []struct {
			Meta   struct{ Name string }
			Status struct{ Phase, Host string }
		}
		ResourceVersion string
	}
	if err := json.Unmarshal(js.Bytes(), &decoded); err != nil {
		t.Fatalf("json output does not parse: %v\n%s", err, js.String())
	}
	if len(decoded.Vms) != 2 || decoded.Vms[0].Meta.Name != "web1" || decoded.Vms[0].Status.Phase != "VM_PHASE_RUNNING" || decoded.ResourceVersion != "42" {
		t.Fatalf("json content: %+v", decoded)
	}
	if !strings.Contains(js.String(), "\n  \"vms\": [") {
		t.Fatalf("json is not indented:\n%s", js.String())
	}

	var ys bytes.Buffer
	if err := printMessage(&ys, formatYAML, resp, nil); err != nil {
		t.Fatal(err)
	}
	fromYAML, err := yaml.YAMLToJSON(ys.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	json.Unmarshal(js.Bytes(), &a)
	json.Unmarshal(fromYAML, &b)
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	if !bytes.Equal(ja, jb) {
		t.Fatalf("yaml differs from json:\n%s\n%s", ja, jb)
	}
}

func TestHumanUnits(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1 KiB", 1536: "1.5 KiB", 2 << 30: "2 GiB", 5<<20 + 1<<19: "5.5 MiB"} {
		if got := bytesIEC(n); got != want {
			t.Errorf("bytesIEC(%d) = %q, want %q", n, got, want)
		}
	}
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fixedNow(t, at)
	for d, want := range map[time.Duration]string{5 * time.Second: "5s", 61 * time.Second: "1m", 47 * time.Hour: "47h", 72 * time.Hour: "3d", -time.Second: "0s"} {
		if got := age(timestamppb.New(at.Add(-d))); got != want {
			t.Errorf("age(%v) = %q, want %q", d, got, want)
		}
	}
	if age(nil) != "-" {
		t.Error("age(nil)")
	}
}

func TestProgressWithoutTerminalWritesOneLine(t *testing.T) {
	var buf bytes.Buffer
	p := newProgress(&buf, false, "debian", 3<<20)
	for range 3 {
		p.add(1 << 20)
	}
	if buf.Len() != 0 {
		t.Fatalf("progress drew on a non-terminal: %q", buf.String())
	}
	p.finish()
	if lines := strings.Count(buf.String(), "\n"); lines != 1 || !strings.Contains(buf.String(), "uploaded 3 MiB") {
		t.Fatalf("summary %q", buf.String())
	}

	buf.Reset()
	p = newProgress(&buf, true, "debian", 2<<20)
	p.add(2 << 20)
	p.finish()
	if !strings.Contains(buf.String(), "\r") || !strings.Contains(buf.String(), "100%") {
		t.Fatalf("terminal bar %q", buf.String())
	}
}

// TestReasonAndMessage: vm show's Message line leaves out an empty half
// instead of printing "Running: ".
func TestReasonAndMessage(t *testing.T) {
	for _, tc := range []struct{ reason, message, want string }{
		{"Running", "", "Running"},
		{"", "placed on host h1", "placed on host h1"},
		{"NoValidHost", "no valid host: 3 hosts", "NoValidHost: no valid host: 3 hosts"},
		{"", "", ""},
	} {
		if got := reasonAndMessage(tc.reason, tc.message); got != tc.want {
			t.Errorf("reasonAndMessage(%q, %q) = %q, want %q", tc.reason, tc.message, got, tc.want)
		}
	}
}

// TestHostFailureOutput: host list and host show say where a dead host
// stands (unreachable since when, when time fences it, who fenced it and
// why), and vm show the VM's policies and assignment epoch.
func TestHostFailureOutput(t *testing.T) {
	if fenceMargin != store.FenceMargin {
		t.Fatalf("the CLI's fence margin %s is not the control plane's %s", fenceMargin, store.FenceMargin)
	}
	at := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	fixedNow(t, at.Add(2*time.Minute))
	up := &minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "hv1"}, State: minicloudv1.HostState_HOST_STATE_UP,
		LastHeartbeat: timestamppb.New(at.Add(2*time.Minute - 3*time.Second)), FenceAfterSeconds: 10}
	unreachable := &minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "hv2"}, State: minicloudv1.HostState_HOST_STATE_UNREACHABLE,
		UnreachableSince: timestamppb.New(at), FenceAfterSeconds: 10}
	fenced := &minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "hv3"}, State: minicloudv1.HostState_HOST_STATE_FENCED, Disabled: true,
		UnreachableSince: timestamppb.New(at.Add(-time.Hour)),
		Fence:            &minicloudv1.HostFence{Time: timestamppb.New(at), By: "operator:admin", Reason: "powered off at the PDU"}}

	var buf bytes.Buffer
	if err := hostTable(&buf, []*minicloudv1.Host{up, unreachable, fenced}); err != nil {
		t.Fatal(err)
	}
	want := [][]string{
		{"NAME", "STATE", "HYPERVISORS", "VCPUS", "MEMORY-MIB", "DISK-GIB", "VMS", "AZ", "HEARTBEAT", "UNREACHABLE"},
		{"hv1", "up", "-", "0/0", "0/0", "0/0", "0", "-", "3s", "-"},
		{"hv2", "unreachable", "-", "0/0", "0/0", "0/0", "0", "-", "-", "2m"},
		{"hv3", "fenced,disabled", "-", "0/0", "0/0", "0/0", "0", "-", "-", "1h"},
	}
	for i, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if got := strings.Fields(line); strings.Join(got, " ") != strings.Join(want[i], " ") {
			t.Fatalf("host list line %d: %q, want %q\n%s", i, got, want[i], buf.String())
		}
	}

	show := func(h *minicloudv1.Host) string {
		buf.Reset()
		if err := hostDetails(&buf, h); err != nil {
			t.Fatal(err)
		}
		return strings.Join(strings.Fields(buf.String()), " ")
	}
	for h, wants := range map[*minicloudv1.Host][]string{
		up: {"State: up", "Self-fencing: after 10s without contact (agent --fence-after)"},
		unreachable: {"State: unreachable", "Unreachable since: 2026-11-25T12:00:00Z (2m ago)",
			"Fenced by time at: 2026-11-25T12:00:15Z (unreachable since + fence-after + 5s)"},
		fenced: {"State: fenced,disabled", "Self-fencing: off (only an operator can fence this host: minicloud host fence hv3 --confirm)",
			"Fenced: 2026-11-25T12:00:00Z by operator:admin", "Fence reason: powered off at the PDU"},
	} {
		got := show(h)
		for _, w := range wants {
			if !strings.Contains(got, w) {
				t.Errorf("host show %s lacks %q:\n%s", h.Meta.Name, w, got)
			}
		}
		if h != unreachable && strings.Contains(got, "Fenced by time") {
			t.Errorf("host show %s gives a time fence deadline:\n%s", h.Meta.Name, got)
		}
	}

	buf.Reset()
	vm := testVMs(at)[0]
	vm.Spec.OnHostFailure = minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE
	vm.Spec.RestartPolicy = minicloudv1.RestartPolicy_RESTART_POLICY_NEVER
	vm.Status.AssignmentEpoch = 3
	if err := vmDetails(&buf, vm); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(strings.Fields(buf.String()), " ")
	for _, w := range []string{"On host failure: evacuate", "Restart policy: never", "Assignment epoch: 3"} {
		if !strings.Contains(got, w) {
			t.Errorf("vm show lacks %q:\n%s", w, buf.String())
		}
	}
	// A VM stored before the policies existed shows the defaults.
	buf.Reset()
	if err := vmDetails(&buf, testVMs(at)[1]); err != nil {
		t.Fatal(err)
	}
	got = strings.Join(strings.Fields(buf.String()), " ")
	for _, w := range []string{"On host failure: stop", "Restart policy: on-failure", "Assignment epoch: 0"} {
		if !strings.Contains(got, w) {
			t.Errorf("vm show of an older VM lacks %q:\n%s", w, buf.String())
		}
	}
}
