package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// The saved assignments over the fakes: what is written when, what a
// restarted agent serves from them and never acts on, and which files it
// refuses. The same restart against the real daemon, libvirt and a booting
// guest is TestGuestServicesOutliveTheAPI (e2e_test.go).

// streamingAPI is fakeAPI whose WatchAssignments plays a fixed list of
// events and then ends, as an API replica going away would.
type streamingAPI struct {
	*fakeAPI
	events []*minicloudv1.AssignmentEvent
}

func (s *streamingAPI) WatchAssignments(context.Context, *minicloudv1.WatchAssignmentsRequest, ...grpc.CallOption) (grpc.ServerStreamingClient[minicloudv1.AssignmentEvent], error) {
	return &playedStream{events: s.events}, nil
}

type playedStream struct {
	grpc.ClientStream
	events []*minicloudv1.AssignmentEvent
}

func (p *playedStream) Recv() (*minicloudv1.AssignmentEvent, error) {
	if len(p.events) == 0 {
		return nil, io.EOF
	}
	ev := p.events[0]
	p.events = p.events[1:]
	return ev, nil
}

// stream plays events as one assignment stream of generation gen.
func (h *harness) stream(gen uint64, events ...*minicloudv1.AssignmentEvent) bool {
	h.t.Helper()
	h.a.hosts = &streamingAPI{fakeAPI: h.api, events: events}
	synced, err := h.a.streamAssignments(context.Background(), gen)
	if !errors.Is(err, io.EOF) {
		h.t.Fatalf("stream ended with %v, want EOF", err)
	}
	return synced
}

func added(vm *minicloudv1.VM, userData []byte) *minicloudv1.AssignmentEvent {
	return &minicloudv1.AssignmentEvent{Type: minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, Vm: vm, UserData: userData}
}

var bookmark = &minicloudv1.AssignmentEvent{Type: minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK}

// runSaver runs the agent's saver until the test ends.
func (h *harness) runSaver() {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = h.a.saveAssignmentsLoop(ctx) }()
	h.t.Cleanup(func() { cancel(); wg.Wait() })
}

// waitSaved waits until the saved file lists exactly ids.
func (h *harness) waitSaved(ids ...string) {
	h.t.Helper()
	slices.Sort(ids)
	want := strings.Join(ids, ",")
	var got string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		guests, _, err := h.a.readAssignmentCache()
		if err != nil {
			got = err.Error()
			continue
		}
		var have []string
		for _, g := range guests {
			have = append(have, g.VM.GetMeta().GetId())
		}
		slices.Sort(have)
		if got = strings.Join(have, ","); got == want {
			return
		}
	}
	h.t.Fatalf("saved assignments: %s, want [%s]", got, want)
}

func (h *harness) setUserData(id string, b []byte) {
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	h.a.assigned[id].userData = b
}

func guestIDs(gs []Guest) []string {
	var out []string
	for _, g := range gs {
		out = append(out, g.VM.GetMeta().GetId())
	}
	return out
}

// TestSavedAssignmentsServeGuestsButNeverDriveDomains: an agent restarted
// while the API is down answers its guests (DHCP, DNS, metadata) from the
// set saved after the last BOOKMARK, but neither creates nor tears down
// anything from it; the live stream's BOOKMARK replaces it — and an API
// that then answers an empty list sends the disk to the trash, not away.
func TestSavedAssignmentsServeGuestsButNeverDriveDomains(t *testing.T) {
	h := newHarness(t)
	h.runSaver()
	id := h.running()
	userData := []byte("#cloud-config\nhostname: web\n")
	h.setUserData(id, userData)
	disk := h.a.diskPath(id)
	if err := os.WriteFile(disk, []byte("the tenant's data"), 0o600); err != nil {
		t.Fatal(err)
	}

	// A stream that breaks before its BOOKMARK saves nothing: the set it
	// delivered may be partial.
	if h.stream(2, added(h.vm(id), userData)) {
		t.Fatal("a stream without BOOKMARK counted as synced")
	}
	time.Sleep(3 * assignmentSaveInterval)
	if _, err := os.Stat(h.a.assignmentCachePath()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("assignments saved before any BOOKMARK: %v", err)
	}
	if !h.stream(3, added(h.vm(id), userData), bookmark) {
		t.Fatal("stream with BOOKMARK not synced")
	}
	h.waitSaved(id)
	if fi, err := os.Stat(h.a.assignmentCachePath()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("saved file: %v, %v; want mode 0600 (user-data may hold secrets)", fi, err)
	}
	// A later change is saved too (here: a second VM assigned).
	h2vm := proto.Clone(h.vm(id)).(*minicloudv1.VM)
	h2vm.Meta.Id, h2vm.Meta.Name = "0d7e2c1a-0000-4000-8000-000000000002", "db"
	h.a.hosts = &streamingAPI{fakeAPI: h.api, events: []*minicloudv1.AssignmentEvent{added(h.vm(id), nil), bookmark, added(h2vm, nil)}}
	if _, err := h.a.streamAssignments(context.Background(), 4); !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	h.waitSaved(id, h2vm.Meta.Id)

	// The agent restarts on the same host; the API does not answer (no
	// stream at all: a.synced stays false).
	r := restartHarness(t, h)
	r.a.synced = false
	if !r.a.loadAssignmentCache() {
		t.Fatal("the saved assignments were not loaded")
	}
	r.a.publishGuests(context.Background())
	served := r.guest.last()
	if got := guestIDs(served); len(got) != 2 {
		t.Fatalf("guests served from the saved set: %v, want both VMs", got)
	}
	for _, g := range served {
		if g.VM.GetMeta().GetId() != id {
			continue
		}
		if !proto.Equal(g.VM, h.vm(id)) || !bytes.Equal(g.UserData, userData) {
			t.Errorf("served %v / %q, want the VM as last streamed and its user-data", g.VM, g.UserData)
		}
	}
	// Nothing acts on the saved copy: no domain defined for the VM that has
	// none, none stopped for the one that runs, no directory moved.
	before := len(r.ops(id))
	for _, vid := range []string{id, h2vm.Meta.Id} {
		r.mustPass(vid)
	}
	r.a.enqueueAll()
	if n := len(r.ops(id)); n != before || len(r.ops(h2vm.Meta.Id)) != 0 {
		t.Fatalf("the saved assignments drove the hypervisor: %v / %v", r.ops(id), r.ops(h2vm.Meta.Id))
	}
	if !r.domain(id).Running {
		t.Fatal("the running domain was stopped from the saved assignments")
	}

	// The API answers, with an empty list (a wrong --api, a restored
	// backup): the live set replaces the saved one at its BOOKMARK, the
	// guests are no longer served, the domain stops, and the disk goes to
	// the trash intact.
	r.runSaver()
	r.stream(1, bookmark)
	if got := guestIDs(r.guest.last()); len(got) != 0 {
		t.Fatalf("after an empty live list the saved guests are still served: %v", got)
	}
	r.waitSaved()
	r.mustPass(id)
	if r.domain(id).Exists {
		t.Error("domain left after the live list dropped it")
	}
	kept, _ := filepath.Glob(filepath.Join(r.a.trashDir(), id+".*", "disk.qcow2"))
	if len(kept) != 1 {
		t.Fatalf("disk not in the trash: %v", kept)
	}
	if b, _ := os.ReadFile(kept[0]); string(b) != "the tenant's data" {
		t.Fatalf("trashed disk holds %q", b)
	}
}

// TestSavedAssignmentsRefused: a file that cannot be trusted as a whole is
// refused with a log line, and nothing is served from it.
func TestSavedAssignmentsRefused(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	h.setUserData(id, []byte("user data"))
	good, _, err := h.a.encodeAssignments()
	if err != nil {
		t.Fatal(err)
	}
	// edit is the good file changed by f.
	edit := func(f func(*savedAssignments)) string {
		var doc savedAssignments
		if err := json.Unmarshal(good, &doc); err != nil {
			t.Fatal(err)
		}
		f(&doc)
		b, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	otherHostVM := proto.Clone(h.vm(id)).(*minicloudv1.VM)
	otherHostVM.Status.Host = "host2"
	otherHostJSON, err := protojson.Marshal(otherHostVM)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, file, want string
		max              int64
	}{
		{"garbage", "\x00\x01garbage", "corrupt", 0},
		{"truncated", string(good[:len(good)/2]), "corrupt", 0},
		{"empty", "", "corrupt", 0},
		{"other format", edit(func(d *savedAssignments) { d.Format = "minicloud.assignments/v0" }), "format", 0},
		{"other host", edit(func(d *savedAssignments) { d.Host = "host2" }), "saved by host", 0},
		{"VM of another host", edit(func(d *savedAssignments) { d.Assignments[0].VM = otherHostJSON }), "not this one", 0},
		{"repeated VM", edit(func(d *savedAssignments) { d.Assignments = append(d.Assignments, d.Assignments[0]) }), "repeated id", 0},
		{"VM without id", edit(func(d *savedAssignments) { d.Assignments[0].VM = json.RawMessage(`{"spec":{}}`) }), "missing", 0},
		{"bad VM", edit(func(d *savedAssignments) { d.Assignments[0].VM = json.RawMessage(`{"meta":7}`) }), "corrupt VM", 0},
		{"over the bound", string(good), "bound", int64(len(good) - 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := restartHarness(t, h)
			var logs bytes.Buffer
			r.a.log = slog.New(slog.NewTextHandler(&logs, nil))
			r.a.synced = false
			r.a.cfg.AssignmentCacheMaxBytes = tc.max
			if err := os.WriteFile(r.a.assignmentCachePath(), []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			if r.a.loadAssignmentCache() || r.a.cachedGuests != nil {
				t.Fatalf("file loaded: %v", slices.Collect(maps.Keys(r.a.cachedGuests)))
			}
			if !strings.Contains(logs.String(), "saved assignments refused") || !strings.Contains(logs.String(), tc.want) {
				t.Fatalf("log %q, want the refusal naming %q", logs.String(), tc.want)
			}
		})
	}
	// The file as written is accepted (the cases above are refused for
	// what they change, not for something else).
	if err := os.WriteFile(h.a.assignmentCachePath(), good, 0o600); err != nil {
		t.Fatal(err)
	}
	if r := restartHarness(t, h); !r.a.loadAssignmentCache() {
		t.Fatal("the untouched file was refused")
	}
}

// TestSavedAssignmentsBounded: a set over the bound is not written, and
// the older file is removed rather than served as if current.
func TestSavedAssignmentsBounded(t *testing.T) {
	h := newHarness(t)
	id := h.running()
	h.a.writeAssignments()
	if _, _, err := h.a.readAssignmentCache(); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	h.a.log = slog.New(slog.NewTextHandler(&logs, nil))
	h.a.cfg.AssignmentCacheMaxBytes = 4 << 10
	h.setUserData(id, make([]byte, 8<<10))
	h.a.writeAssignments()
	if _, err := os.Stat(h.a.assignmentCachePath()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("an over-bound set left a file: %v", err)
	}
	if !strings.Contains(logs.String(), "over the 4096-byte bound") {
		t.Fatalf("log %q, want the bound named", logs.String())
	}
	if leftovers, _ := filepath.Glob(filepath.Join(h.a.cfg.StateDir, ".assignments*")); len(leftovers) != 0 {
		t.Fatalf("temporary files left: %v", leftovers)
	}
}
