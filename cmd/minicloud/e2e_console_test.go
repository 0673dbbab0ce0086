package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/hypervisor/hypervisortest"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// consoleSession is one AttachConsole stream of a test, and what it read.
type consoleSession struct {
	t      *testing.T
	stream minicloudv1.VMService_AttachConsoleClient
	att    *minicloudv1.ConsoleAttached

	mu      sync.Mutex
	out     bytes.Buffer
	notices []string
	closed  string
	err     error // how the stream ended (nil: EOF)
	done    chan struct{}
	kick    chan struct{}
}

func attachConsole(t *testing.T, c *cloud, name string, write, takeOver bool) (*consoleSession, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := c.Client.VMs.AttachConsole(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Attach{Attach: &minicloudv1.ConsoleAttach{Name: name, Write: write, TakeOver: takeOver}}}); err != nil {
		_, err = stream.Recv()
		return nil, err
	}
	first, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	s := &consoleSession{t: t, stream: stream, att: first.GetAttached(), done: make(chan struct{}), kick: make(chan struct{}, 1)}
	if s.att == nil {
		t.Fatalf("first console message is %v, want attached", first)
	}
	go func() {
		defer close(s.done)
		for {
			m, err := stream.Recv()
			s.mu.Lock()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					s.err = err
				}
				s.mu.Unlock()
				return
			}
			s.out.Write(m.GetData())
			if n := m.GetNotice(); n != nil {
				s.notices = append(s.notices, n.GetMessage())
			}
			if cl := m.GetClosed(); cl != nil {
				s.closed = cl.GetReason()
			}
			s.mu.Unlock()
			select {
			case s.kick <- struct{}{}:
			default:
			}
		}
	}()
	return s, nil
}

func (s *consoleSession) Write(p []byte) (int, error) {
	if err := s.stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Data{Data: p}}); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *consoleSession) has(want string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Contains(s.out.String(), want)
}

// waitFor waits for want in the output (or notices, with notice).
func (s *consoleSession) waitFor(want string, notice bool) {
	s.t.Helper()
	deadline := time.After(2 * time.Minute)
	for {
		s.mu.Lock()
		found := strings.Contains(s.out.String(), want)
		if notice {
			found = strings.Contains(strings.Join(s.notices, "\n"), want)
		}
		s.mu.Unlock()
		if found {
			return
		}
		select {
		case <-s.kick:
		case <-s.done:
			s.t.Fatalf("console stream ended (%v) before %q", s.err, want)
		case <-deadline:
			s.t.Fatalf("no %q on the console within 2m; output tail: %q", want, s.tail())
		}
	}
}

func (s *consoleSession) tail() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.out.String()
	return b[max(0, len(b)-500):]
}

// detach closes the send side and waits for the server to end the stream.
func (s *consoleSession) detach() {
	s.t.Helper()
	_ = s.stream.CloseSend()
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		s.t.Fatal("the console stream did not end after detaching")
	}
	if s.err != nil {
		s.t.Fatalf("console stream ended with %v after detaching", s.err)
	}
}

// wantStatus checks an error's kind (pkg/client maps gRPC codes back to
// errdefs kinds) and message.
func wantStatus(t *testing.T, err error, kind errdefs.Kind, msg string) {
	t.Helper()
	if errdefs.KindOf(err) != kind || !strings.Contains(err.Error(), msg) {
		t.Fatalf("got %v (%s), want %s containing %q", err, errdefs.KindOf(err), kind, msg)
	}
}

// TestE2EConsoleAndStats attaches to the serial console of a tiny guest
// booted by the all-in-one, through the whole path (API -> agent ->
// libvirt's console stream): typing into the guest's shell and reading its
// answer, two watchers, the one-writer rule and take-over, detach and
// re-attach, the CLI in a pseudo-terminal (raw mode, Ctrl-], the terminal
// restored), the stats counters growing, and a stopped VM's refusal.
func TestE2EConsoleAndStats(t *testing.T) {
	cloudtest.RequireHypervisorHost(t)
	images := cloudtest.TinyImage(t)
	c := startCloud(t)
	c.WaitHostUp()
	c.ok("network", "create", "default", "--cidr", fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(50), rand.IntN(250)))
	c.ok("flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	c.ImportImage("tiny", images)
	t.Cleanup(func() { c.mc("vm", "delete", "demo", "--wait", "--timeout", "5m") })
	if r := c.mc("vm", "create", "demo", "--image", "tiny", "--flavor", "tiny", "--wait", "--timeout", "10m"); r.code != 0 {
		t.Fatalf("vm create: %s\n%s", r.stderr, c.Log())
	}
	// The guest's shell starts after its boot scripts.
	deadline := time.Now().Add(6 * time.Minute)
	for !strings.Contains(c.ok("vm", "console-log", "demo"), "MINICLOUD-TINY-SHELL") {
		if time.Now().After(deadline) {
			t.Fatalf("no shell on the guest's console; log:\n%s", c.ok("vm", "console-log", "demo"))
		}
		time.Sleep(time.Second)
	}

	// A writer and a watcher: the watcher sees the shell's answer too.
	w, err := attachConsole(t, c, "demo", true, false)
	if err != nil {
		t.Fatalf("attach writer: %v", err)
	}
	if !w.att.GetWriter() || w.att.GetHost() == "" {
		t.Errorf("writer attached as %v", w.att)
	}
	r, err := attachConsole(t, c, "demo", false, false)
	if err != nil {
		t.Fatalf("attach reader: %v", err)
	}
	if r.att.GetWriter() || r.att.GetReaders() != 2 {
		t.Errorf("reader attached as %v, want not writer, 2 sessions", r.att)
	}
	before, err := c.Client.VMs.GetVMStats(context.Background(), &minicloudv1.GetVMStatsRequest{Name: "demo"})
	if err != nil {
		t.Fatalf("GetVMStats: %v", err)
	}
	answer := hypervisortest.ShellRoundTrip(t, w, w.has, w.kick, 2*time.Minute)
	r.waitFor(answer, false)

	// The guest works (a busy loop in its shell); its CPU time grows.
	w.Write([]byte("i=0; while [ $i -lt 5000 ]; do i=$((i+1)); done; echo loo''p-done\r"))
	w.waitFor("loop-done", false)
	after, err := c.Client.VMs.GetVMStats(context.Background(), &minicloudv1.GetVMStatsRequest{Name: "demo"})
	if err != nil {
		t.Fatalf("GetVMStats: %v", err)
	}
	if !after.GetTime().AsTime().After(before.GetTime().AsTime()) || after.GetCpuTimeNs() <= before.GetCpuTimeNs() {
		t.Errorf("stats did not grow: %v -> %v", before, after)
	}
	if after.GetVcpus() != 1 || after.GetMemoryActualKib() != 256<<10 || len(after.GetDisks()) == 0 || after.GetDisks()[0].GetDevice() != "vda" ||
		len(after.GetInterfaces()) != 1 || after.GetInterfaces()[0].GetRxPackets()+after.GetInterfaces()[0].GetTxPackets() == 0 {
		t.Errorf("stats %v: want 1 vCPU, 256 MiB, vda, one NIC that carried packets (DHCP)", after)
	}
	if out := c.ok("vm", "top", "demo", "--once"); !strings.Contains(out, "vda") || !strings.Contains(out, "CPU time") {
		t.Errorf("vm top --once:\n%s", out)
	}
	if out := c.ok("vm", "top", "demo", "--count", "1", "--interval", "500ms"); !strings.Contains(out, "% of one vCPU") || !strings.Contains(out, "READ/S") {
		t.Errorf("vm top --count 1:\n%s", out)
	}

	// One writer: a second is refused, naming the first; a take-over
	// demotes the first, who is told.
	_, err = attachConsole(t, c, "demo", true, false)
	wantStatus(t, err, errdefs.KindFailedPrecondition, "the console of VM demo is being written by user admin")
	c.fails(exitConflict, "being written by", "vm", "console", "demo")
	w2, err := attachConsole(t, c, "demo", true, true)
	if err != nil {
		t.Fatalf("take over: %v", err)
	}
	w.waitFor("took over", true)
	// The demoted session goes on watching; what it types is dropped, and
	// it is told.
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatalf("type into a watching session: %v", err)
	}
	w.waitFor("only watches", true)
	answer = hypervisortest.ShellRoundTrip(t, w2, w2.has, w2.kick, 2*time.Minute)
	r.waitFor(answer, false)
	w.waitFor(answer, false) // still watching

	// Detach everyone; a new session works again.
	for _, s := range []*consoleSession{w, r, w2} {
		s.detach()
	}
	w, err = attachConsole(t, c, "demo", true, false)
	if err != nil {
		t.Fatalf("re-attach: %v", err)
	}
	hypervisortest.ShellRoundTrip(t, w, w.has, w.kick, 2*time.Minute)
	w.detach()

	cliConsoleThroughPTY(t, c)

	// A stopped VM has no console, and says what to do.
	c.ok("vm", "stop", "demo")
	c.ok("vm", "wait", "demo", "--for", "stopped", "--timeout", "5m")
	_, err = attachConsole(t, c, "demo", false, false)
	wantStatus(t, err, errdefs.KindFailedPrecondition, "VM demo is STOPPED; start it first")
	c.fails(exitConflict, "VM demo is STOPPED; start it first", "vm", "console", "demo")
	_, err = c.Client.VMs.GetVMStats(context.Background(), &minicloudv1.GetVMStatsRequest{Name: "demo"})
	wantStatus(t, err, errdefs.KindFailedPrecondition, "is STOPPED")
	_, err = attachConsole(t, c, "nosuchvm", false, false)
	wantStatus(t, err, errdefs.KindNotFound, "nosuchvm")
}

// cliConsoleThroughPTY runs `minicloud vm console` on a pseudo-terminal as
// a person would: raw mode while attached, typing reaches the guest's
// shell, Ctrl-] detaches, and the terminal's settings are as before.
func cliConsoleThroughPTY(t *testing.T, c *cloud) {
	t.Helper()
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Fatalf("open a pty: %v", err)
	}
	defer ptmx.Close()
	defer tty.Close()
	termios := func() unix.Termios {
		t.Helper()
		tio, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		return *tio
	}
	orig := termios()
	if orig.Lflag&unix.ICANON == 0 || orig.Lflag&unix.ECHO == 0 {
		t.Fatalf("a new pty is not in cooked mode: lflag %#x", orig.Lflag)
	}
	cmd := c.command("", "vm", "console", "demo")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
		}
	}()

	var mu sync.Mutex
	var out bytes.Buffer
	kick := make(chan struct{}, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ptmx.Read(buf)
			mu.Lock()
			out.Write(buf[:n])
			mu.Unlock()
			select {
			case kick <- struct{}{}:
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	has := func(s string) bool {
		mu.Lock()
		defer mu.Unlock()
		return strings.Contains(out.String(), s)
	}
	deadline := time.After(time.Minute)
	for !has("Escape character is ^]") {
		select {
		case <-kick:
		case err := <-exited:
			t.Fatalf("vm console exited (%v) before attaching: %q", err, out.String())
		case <-deadline:
			t.Fatalf("vm console did not attach: %q", out.String())
		}
	}
	hypervisortest.ShellRoundTrip(t, ptmx, has, kick, 2*time.Minute)
	if raw := termios(); raw.Lflag&(unix.ICANON|unix.ECHO|unix.ISIG) != 0 {
		t.Errorf("attached, the terminal is not raw: lflag %#x", raw.Lflag)
	}
	if _, err := ptmx.Write([]byte{0x1d}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("vm console after Ctrl-]: %v; output %q", err, out.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("vm console still runs a minute after Ctrl-]; output %q", out.String())
	}
	if got := termios(); got.Lflag != orig.Lflag || got.Iflag != orig.Iflag || got.Oflag != orig.Oflag || got.Cflag != orig.Cflag {
		t.Errorf("terminal not restored: %+v, was %+v", got, orig)
	}
	// The process has exited, but what it wrote last may still sit in the
	// pty's buffer, not yet read by the reader above: wait for it.
	detachDeadline := time.After(10 * time.Second)
	for !has("Detached from the console of VM demo") {
		select {
		case <-kick:
		case <-detachDeadline:
			mu.Lock()
			t.Errorf("no detach message: %q", out.String())
			mu.Unlock()
			return
		}
	}
}
