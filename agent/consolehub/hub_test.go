package consolehub_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/minicloud/minicloud/agent/consolehub"
	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/hypervisor/hypervisortest"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// These run the hub over the fake driver, whose console plays a shell and
// which, like libvirt, hands out one console per domain at a time. The
// real path (API -> agent -> libvirt) is tested in agent's e2e tests.

func runningVM(t *testing.T, d hypervisor.Driver) string {
	t.Helper()
	id := uuid.NewString()
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.qcow2")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	spec := hypervisor.DomainSpec{VMID: id, VCPUs: 1, MemoryMiB: 64, Hypervisor: hypervisor.TCG, DiskPath: disk, ConsoleLogPath: filepath.Join(dir, "console.log")}
	if err := d.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	return id
}

// collector gathers a session's events.
type collector struct {
	mu      sync.Mutex
	out     bytes.Buffer
	notices []consolehub.Event
	closed  string
	done    chan struct{}
	kick    chan struct{}
}

func collect(s *consolehub.Session) *collector {
	c := &collector{done: make(chan struct{}), kick: make(chan struct{}, 1)}
	go func() {
		defer close(c.done)
		for ev := range s.Events() {
			c.mu.Lock()
			c.out.Write(ev.Data)
			if ev.WriterLost || ev.Message != "" {
				c.notices = append(c.notices, ev)
			}
			if ev.Closed != "" {
				c.closed = ev.Closed
			}
			c.mu.Unlock()
			select {
			case c.kick <- struct{}{}:
			default:
			}
		}
	}()
	return c
}

func (c *collector) has(s string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Contains(c.out.String(), s)
}

func (c *collector) waitFor(t *testing.T, s string) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for !c.has(s) {
		select {
		case <-c.kick:
		case <-deadline:
			t.Fatalf("no %q in console output %q", s, c.out.String())
		}
	}
}

type sessionWriter struct{ s *consolehub.Session }

func (w sessionWriter) Write(p []byte) (int, error) { return len(p), w.s.Write(p) }

func TestReadersWriterTakeOverReplay(t *testing.T) {
	host := hypervisortest.NewFakeHost()
	d := hypervisortest.NewFakeDriver(host)
	hub := consolehub.New(d, consolehub.Limits{SessionsPerVM: 3})
	ctx := context.Background()
	id := runningVM(t, d)

	w, err := hub.Attach(ctx, id, consolehub.AttachOptions{Write: true, Who: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	wc := collect(w)
	r, err := hub.Attach(ctx, id, consolehub.AttachOptions{Who: "bob"})
	if err != nil {
		t.Fatal(err)
	}
	if r.Readers != 2 || r.Writer() {
		t.Errorf("reader: readers %d writer %v, want 2 and false", r.Readers, r.Writer())
	}
	rc := collect(r)
	answer := hypervisortest.ShellRoundTrip(t, sessionWriter{w}, wc.has, wc.kick, 30*time.Second)
	rc.waitFor(t, answer) // the reader sees what the writer caused

	if err := r.Write([]byte("x")); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("a reader's write: %v, want FailedPrecondition", err)
	}
	if _, err := hub.Attach(ctx, id, consolehub.AttachOptions{Write: true, Who: "carol"}); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "alice") {
		t.Errorf("a second writer: %v, want FailedPrecondition naming alice", err)
	}
	// Take-over: carol writes, alice is told and only reads; carol got
	// the recent output replayed.
	c, err := hub.Attach(ctx, id, consolehub.AttachOptions{Write: true, TakeOver: true, Who: "carol"})
	if err != nil {
		t.Fatalf("take over: %v", err)
	}
	if c.Replayed == 0 || !c.Writer() || w.Writer() {
		t.Errorf("after take-over: replayed %d, carol writer %v, alice writer %v", c.Replayed, c.Writer(), w.Writer())
	}
	cc := collect(c)
	cc.waitFor(t, answer)
	if _, err := hub.Attach(ctx, id, consolehub.AttachOptions{Who: "dave"}); !errdefs.IsResourceExhausted(err) {
		t.Errorf("a fourth session with a limit of 3: %v, want ResourceExhausted", err)
	}
	hypervisortest.ShellRoundTrip(t, sessionWriter{c}, rc.has, rc.kick, 30*time.Second)
	if err := w.Write([]byte("x")); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("the demoted writer's write: %v, want FailedPrecondition", err)
	}
	w.Notify("input dropped")
	deadline := time.After(30 * time.Second)
	for {
		wc.mu.Lock()
		n := len(wc.notices)
		wc.mu.Unlock()
		if n == 2 {
			break
		}
		select {
		case <-wc.kick:
		case <-deadline:
			t.Fatalf("alice got %d notices, want the take-over and the dropped input", n)
		}
	}
	wc.mu.Lock()
	if !wc.notices[0].WriterLost || wc.notices[1].WriterLost || wc.notices[1].Message != "input dropped" {
		t.Errorf("alice's notices: %+v", wc.notices)
	}
	wc.mu.Unlock()

	// Everyone detaches: the stream is released (the driver would refuse a
	// second open otherwise), and a new session works.
	for _, s := range []*consolehub.Session{w, r, c} {
		s.Detach()
	}
	<-wc.done
	s, err := d.OpenConsole(ctx, id)
	if err != nil {
		t.Fatalf("console not released after the last detach: %v", err)
	}
	s.Close()
	again, err := hub.Attach(ctx, id, consolehub.AttachOptions{Write: true, Who: "alice"})
	if err != nil {
		t.Fatalf("re-attach: %v", err)
	}
	ac := collect(again)
	hypervisortest.ShellRoundTrip(t, sessionWriter{again}, ac.has, ac.kick, 30*time.Second)

	// The VM stops: the session ends with a reason.
	if err := d.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
	<-ac.done
	if ac.closed == "" {
		t.Error("session ended without a reason when the VM stopped")
	}
	if _, err := hub.Attach(ctx, id, consolehub.AttachOptions{}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("attach to a stopped VM: %v, want FailedPrecondition", err)
	}
}

func TestHostLimit(t *testing.T) {
	host := hypervisortest.NewFakeHost()
	d := hypervisortest.NewFakeDriver(host)
	hub := consolehub.New(d, consolehub.Limits{Sessions: 2})
	ctx := context.Background()
	a, b := runningVM(t, d), runningVM(t, d)
	s1, err := hub.Attach(ctx, a, consolehub.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hub.Attach(ctx, b, consolehub.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := hub.Attach(ctx, b, consolehub.AttachOptions{}); !errdefs.IsResourceExhausted(err) {
		t.Errorf("a third session with a host limit of 2: %v, want ResourceExhausted", err)
	}
	s1.Detach()
	if _, err := hub.Attach(ctx, a, consolehub.AttachOptions{}); err != nil {
		t.Errorf("after a detach there is room again: %v", err)
	}
}
