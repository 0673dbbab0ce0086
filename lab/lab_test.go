package lab

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestNewFillsDefaultsAndRefusesNonsense(t *testing.T) {
	l, err := New(Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if l.Name != DefaultName || l.Dir != DefaultDir || l.Hosts != DefaultHosts || l.Subnet.String() != DefaultSubnet {
		t.Errorf("defaults: %+v", l.Config)
	}
	for _, c := range []Config{
		{Name: "toolongname"},
		{Dir: "relative"},
		{Dir: "/"},
		{Hosts: -1},
		{Subnet: netip.MustParsePrefix("10.0.0.0/28")},
		{Subnet: netip.MustParsePrefix("fd00::/64")},
	} {
		if _, err := New(c, nil); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}

// TestLayout: addresses do not overlap, interface names fit IFNAMSIZ even
// at the largest lab, and hosts differ in capacity.
func TestLayout(t *testing.T) {
	l, err := New(Config{Name: "abcdef", Hosts: 200}, nil)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Addr]string{l.RouterAddr(): "router"}
	for i := 1; i <= etcdMembers; i++ {
		a := l.ControlAddr(i)
		if seen[a] != "" {
			t.Fatalf("control node %d shares %s with %s", i, a, seen[a])
		}
		seen[a] = "control"
	}
	caps := map[Capacity]bool{}
	for _, h := range l.HostNames() {
		a := l.HostAddr(h)
		if seen[a] != "" || !l.Subnet.Contains(a) {
			t.Fatalf("host %s at %s (taken by %q, subnet %s)", h, a, seen[a], l.Subnet)
		}
		seen[a] = h
		if n := l.uplinkName(h); len(n) > 15 {
			t.Errorf("uplink name %q is longer than 15 bytes", n)
		}
		c := l.HostCapacity(h)
		if caps[c] || c.VCPUs <= 0 || c.MemoryMiB <= 0 || c.DiskGiB <= 0 {
			t.Errorf("host %s capacity %+v is not its own", h, c)
		}
		caps[c] = true
	}
	if len(l.BridgeName()) > 15 {
		t.Errorf("bridge name %q too long", l.BridgeName())
	}
	if err := l.checkHost("host201"); err == nil {
		t.Error("host201 accepted in a 200-host lab")
	}
}

// TestProcessBookkeeping: a started process is found by its pid file,
// stop ends it, and a pid file whose pid now runs something else is not
// taken for the process (nothing is killed by a reused pid).
func TestProcessBookkeeping(t *testing.T) {
	dir := t.TempDir()
	l, err := New(Config{Dir: dir}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{l.logDir(), filepath.Join(dir, "pids")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	p := proc{Name: "sleeper", Argv: []string{"/bin/sleep", "300"}}
	if err := l.start(p); err != nil {
		t.Fatal(err)
	}
	pid, ok := l.running("sleeper")
	if !ok {
		t.Fatal("started process not running")
	}
	if err := l.start(p); err != nil { // idempotent
		t.Fatal(err)
	}
	if again, _ := l.running("sleeper"); again != pid {
		t.Errorf("second start replaced pid %d with %d", pid, again)
	}
	if err := l.stop("sleeper", syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, ok := l.running("sleeper"); ok {
		t.Error("still running after stop")
	}
	if err := l.stop("sleeper", syscall.SIGTERM, time.Second); err != nil {
		t.Errorf("stopping a stopped process: %v", err)
	}

	// Our own pid with another command line: not the lab's process.
	if pidRuns(os.Getpid(), []string{"/bin/sleep", "300"}) {
		t.Error("pidRuns matched a process running another command")
	}
	if err := l.Kill("sleeper"); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Errorf("Kill of a stopped process: %v", err)
	}
	b, _ := os.ReadFile(l.LogFile("sleeper"))
	if !strings.Contains(string(b), "/bin/sleep 300") {
		t.Errorf("log has no start line: %q", b)
	}
}

// TestCapacityOverride: Config.Capacity replaces the per-host table for
// every host, and survives the round trip through lab.json.
func TestCapacityOverride(t *testing.T) {
	want := Capacity{VCPUs: 60, MemoryMiB: 15360, DiskGiB: 120}
	l, err := New(Config{Dir: t.TempDir(), Hosts: 3, Capacity: &want}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.save(); err != nil {
		t.Fatal(err)
	}
	loaded, err := Load(l.Dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range loaded.HostNames() {
		if got := loaded.HostCapacity(h); got != want {
			t.Errorf("%s: capacity %+v, want %+v", h, got, want)
		}
	}
}
