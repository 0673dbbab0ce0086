package lab

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A lab process runs detached from whoever started it (make lab returns,
// the processes stay), in its own session, with its output in
// Dir/logs/NAME.log. Its pid file records the pid and the exact argv, so a
// pid reused by an unrelated process is never mistaken for it.

// proc is one daemon of the lab.
type proc struct {
	Name string
	Argv []string
	// Host, if set, runs the process inside that host's network and
	// mount namespaces.
	Host string
}

type pidFile struct {
	Pid  int      `json:"pid"`
	Argv []string `json:"argv"`
}

func (l *Lab) pidPath(name string) string { return filepath.Join(l.Dir, "pids", name+".json") }

// running returns the pid of the named process if it is alive.
func (l *Lab) running(name string) (int, bool) {
	b, err := os.ReadFile(l.pidPath(name))
	if err != nil {
		return 0, false
	}
	var pf pidFile
	if json.Unmarshal(b, &pf) != nil || pf.Pid <= 0 {
		return 0, false
	}
	return pf.Pid, pidRuns(pf.Pid, pf.Argv)
}

// pidRuns says whether pid is alive and runs argv (a zombie has an empty
// cmdline and does not count).
func pidRuns(pid int, argv []string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return false
	}
	got := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
	return slices.Equal(got, argv)
}

// start starts p unless it is already running.
func (l *Lab) start(p proc) error {
	if pid, ok := l.running(p.Name); ok {
		l.logf("%s already running (pid %d)", p.Name, pid)
		return nil
	}
	argv := p.Argv
	path := argv[0]
	args := argv[1:]
	if p.Host != "" {
		// nsenter execs the command in place (no --pid), so the pid
		// we record is the daemon's own.
		path = "nsenter"
		args = append([]string{"--net=" + l.netnsPath(p.Host), "--mount=" + l.mountNSPath(p.Host), "--"}, argv...)
	}
	logf, err := os.OpenFile(l.LogFile(p.Name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("log of %s: %w", p.Name, err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "---- %s start: %s\n", time.Now().UTC().Format(time.RFC3339), strings.Join(argv, " "))
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	// Reap it if it dies while this process lives (a test); once we exit
	// it is init's child.
	go func() { _ = cmd.Wait() }()
	pf, _ := json.Marshal(pidFile{Pid: cmd.Process.Pid, Argv: argv})
	if err := os.WriteFile(l.pidPath(p.Name), pf, 0o644); err != nil {
		return fmt.Errorf("pid file of %s: %w", p.Name, err)
	}
	// nsenter replaces itself with the daemon: wait for that, so a
	// caller that checks running() right away sees it.
	deadline := time.Now().Add(5 * time.Second)
	for !pidRuns(cmd.Process.Pid, argv) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s exited at once; see %s:\n%s", p.Name, l.LogFile(p.Name), l.tail(p.Name))
		}
		time.Sleep(20 * time.Millisecond)
	}
	l.logf("started %s (pid %d)", p.Name, cmd.Process.Pid)
	return nil
}

// stop sends sig to the named process and waits up to grace for it to
// exit, then kills it. Stopping a process that does not run is a no-op.
func (l *Lab) stop(name string, sig syscall.Signal, grace time.Duration) error {
	b, err := os.ReadFile(l.pidPath(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var pf pidFile
	if err := json.Unmarshal(b, &pf); err != nil {
		return fmt.Errorf("pid file of %s: %w", name, err)
	}
	if pidRuns(pf.Pid, pf.Argv) {
		_ = syscall.Kill(pf.Pid, sig)
		deadline := time.Now().Add(grace)
		for pidRuns(pf.Pid, pf.Argv) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if pidRuns(pf.Pid, pf.Argv) {
			_ = syscall.Kill(pf.Pid, syscall.SIGKILL)
			for i := 0; i < 100 && pidRuns(pf.Pid, pf.Argv); i++ {
				time.Sleep(50 * time.Millisecond)
			}
		}
		if pidRuns(pf.Pid, pf.Argv) {
			return fmt.Errorf("%s (pid %d) does not die", name, pf.Pid)
		}
		l.logf("stopped %s (pid %d)", name, pf.Pid)
	}
	return os.Remove(l.pidPath(name))
}

// Kill sends SIGKILL to one of the lab's processes (etcd1-3, api1-2,
// scheduler1-2, or a host's agent, libvirtd or virtlogd: "host1-agent"),
// as a crash would; Restart brings it back. For fault-injection tests.
func (l *Lab) Kill(name string) error {
	if _, ok := l.running(name); !ok {
		return fmt.Errorf("lab process %s is not running", name)
	}
	return l.stop(name, syscall.SIGKILL, 5*time.Second)
}

// tail returns the last lines of a process's log.
func (l *Lab) tail(name string) string {
	b, _ := os.ReadFile(l.LogFile(name))
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// nsPids lists the processes whose network namespace is the one at nsPath.
func nsPids(nsPath string) ([]int, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(nsPath, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil && link == want {
			out = append(out, pid)
		}
	}
	return out, nil
}
