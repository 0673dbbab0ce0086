package hypervisortest

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// consoleReader collects what a console stream outputs, until it ends.
type consoleReader struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	err  error
	done chan struct{}
	kick chan struct{}
}

func readConsole(c io.Reader) *consoleReader {
	r := &consoleReader{done: make(chan struct{}), kick: make(chan struct{}, 1)}
	go func() {
		defer close(r.done)
		p := make([]byte, 4096)
		for {
			n, err := c.Read(p)
			r.mu.Lock()
			r.buf.Write(p[:n])
			if err != nil {
				r.err = err
			}
			r.mu.Unlock()
			select {
			case r.kick <- struct{}{}:
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	return r
}

func (r *consoleReader) has(s string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Contains(r.buf.String(), s)
}

func (r *consoleReader) tail() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	b := r.buf.String()
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return b
}

// ShellRoundTrip types `echo hel”lo-N` into a console until the shell's
// answer "hello-N" comes back (the typed line, echoed by the tty, still has
// the quotes, so only the shell's answer matches). It types again every
// couple of seconds: input sent before the guest's shell opened the serial
// port is lost. It returns the answer it waited for.
func ShellRoundTrip(t testing.TB, w io.Writer, has func(string) bool, kick <-chan struct{}, timeout time.Duration) string {
	t.Helper()
	n := rand.IntN(1 << 30)
	want := fmt.Sprintf("hello-%d", n)
	cmd := fmt.Sprintf("echo hel''lo-%d\r", n)
	deadline := time.After(timeout)
	for {
		if _, err := io.WriteString(w, cmd); err != nil {
			t.Fatalf("type into console: %v", err)
		}
		retype := time.After(2 * time.Second)
	wait:
		for {
			if has(want) {
				return want
			}
			select {
			case <-kick:
			case <-retype:
				break wait
			case <-deadline:
				t.Fatalf("no %q from the console's shell within %s", want, timeout)
			}
		}
	}
}

// startShell starts spec's domain and waits for the guest's console shell.
func (s *suite) startShell(t *testing.T, d hypervisor.Driver, spec hypervisor.DomainSpec) {
	t.Helper()
	if err := d.Start(ctxFor(t, time.Minute), spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if s.fx.ShellMarker != "" {
		s.waitConsole(t, spec, s.fx.ShellMarker, 1)
	}
}

// console: a running guest's shell answers through the console; the
// hypervisor gives out one console at a time; closing releases it; the
// stream ends when the guest stops; a stopped or absent domain has none.
func (s *suite) console(t *testing.T) {
	d := s.newDriver(t)
	ctx := ctxFor(t, 3*s.fx.BootTimeout)
	if _, err := d.OpenConsole(ctx, "00000000-0000-4000-8000-000000000000"); !errdefs.IsNotFound(err) {
		t.Errorf("OpenConsole of an absent domain: %v, want NotFound", err)
	}
	spec := s.defined(t, d)
	if _, err := d.OpenConsole(ctx, spec.VMID); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("OpenConsole of a defined, stopped domain: %v, want FailedPrecondition", err)
	}
	s.startShell(t, d, spec)

	c, err := d.OpenConsole(ctx, spec.VMID)
	if err != nil {
		t.Fatalf("OpenConsole: %v", err)
	}
	r := readConsole(c)
	ShellRoundTrip(t, c, r.has, r.kick, s.fx.BootTimeout)

	if c2, err := d.OpenConsole(ctx, spec.VMID); !errdefs.IsConflict(err) {
		if c2 != nil {
			c2.Close()
		}
		t.Errorf("second OpenConsole while one is open: %v, want Conflict", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case <-r.done:
	case <-time.After(time.Minute):
		t.Fatal("reading a closed console did not end")
	}

	// Released: opened and closed again at once, over and over, each open
	// gets the console (a person detaching and re-attaching quickly).
	for i := range 20 {
		c, err := d.OpenConsole(ctx, spec.VMID)
		if err != nil {
			t.Fatalf("OpenConsole %d right after a Close: %v", i+1, err)
		}
		if err := c.Close(); err != nil {
			t.Fatalf("Close %d: %v", i+1, err)
		}
	}

	// Released: a new console works, and ends when the guest stops.
	c, err = d.OpenConsole(ctx, spec.VMID)
	if err != nil {
		t.Fatalf("OpenConsole after Close: %v", err)
	}
	defer c.Close()
	r = readConsole(c)
	ShellRoundTrip(t, c, r.has, r.kick, s.fx.BootTimeout)
	if err := d.Destroy(ctx, spec.VMID); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	select {
	case <-r.done:
	case <-time.After(time.Minute):
		t.Fatalf("console stream did not end when the domain stopped; output:\n%s", r.tail())
	}
	if _, err := d.OpenConsole(ctx, spec.VMID); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("OpenConsole after Destroy: %v, want FailedPrecondition", err)
	}
}

// stats: a running domain's counters describe its spec and grow while the
// guest works; a stopped or absent one has none.
func (s *suite) stats(t *testing.T) {
	d := s.newDriver(t)
	ctx := ctxFor(t, 3*s.fx.BootTimeout)
	if _, err := d.Stats(ctx, "00000000-0000-4000-8000-000000000000"); !errdefs.IsNotFound(err) {
		t.Errorf("Stats of an absent domain: %v, want NotFound", err)
	}
	spec := s.defined(t, d)
	if _, err := d.Stats(ctx, spec.VMID); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Stats of a stopped domain: %v, want FailedPrecondition", err)
	}
	s.startShell(t, d, spec)
	first, err := d.Stats(ctx, spec.VMID)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if first.Time.IsZero() || first.CPUTimeNs == 0 || first.VCPUs != spec.VCPUs || first.MemoryActualKiB != uint64(spec.MemoryMiB)<<10 {
		t.Errorf("stats %+v: want a time, cpu time, %d vcpus, %d KiB", first, spec.VCPUs, spec.MemoryMiB<<10)
	}
	if len(first.Disks) == 0 || first.Disks[0].Device != "vda" {
		t.Errorf("disk stats %+v: want vda first", first.Disks)
	}
	if len(first.Interfaces) != len(spec.NICs) {
		t.Errorf("interface stats %+v: want %d", first.Interfaces, len(spec.NICs))
	}
	for i, n := range spec.NICs {
		if i < len(first.Interfaces) && first.Interfaces[i].Device != n.TapName {
			t.Errorf("interface %d is %q, want tap %s", i, first.Interfaces[i].Device, n.TapName)
		}
	}
	// Make the guest work through its console, then sample again.
	c, err := d.OpenConsole(ctx, spec.VMID)
	if err != nil {
		t.Fatalf("OpenConsole: %v", err)
	}
	defer c.Close()
	r := readConsole(c)
	ShellRoundTrip(t, c, r.has, r.kick, s.fx.BootTimeout)
	second, err := d.Stats(ctx, spec.VMID)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if !second.Time.After(first.Time) || second.CPUTimeNs <= first.CPUTimeNs {
		t.Errorf("after work: time %s -> %s, cpu %d -> %d ns: want both to grow", first.Time, second.Time, first.CPUTimeNs, second.CPUTimeNs)
	}
}
