// Package sysmon keeps the Go runtime's monitor thread (sysmon) from
// sleeping deeply in the daemons.
//
// When every P of a process is idle, sysmon parks until a system call
// wakes it: the goroutine entering the call pays a futex wake-up, and
// sysmon then polls every 20 µs until it finds the process idle again. A
// server whose requests are short and often apart (the metadata service,
// on cores it shares with guests) goes idle and wakes thousands of times
// a second, and each cycle costs more than answering a request: under
// hack/metabench the service's CPU per request was 25-34 µs with the
// runtime's default and 14.5 µs without the deep sleep (docs/benchmarks.md).
// The runtime has one switch for it, schedtrace: set, sysmon never parks
// and polls at most every 10 ms when idle. Its other effects are a
// scheduler summary line on stderr every schedtrace milliseconds (here
// 2^31-1, about 25 days) and a scheduler dump on a fatal error.
package sysmon

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// Setting is the GODEBUG entry that keeps sysmon polling.
const Setting = "schedtrace=2147483647"

// Env returns env with Setting added to GODEBUG, and whether it changed
// anything: a GODEBUG that already names schedtrace (schedtrace=0 opts
// out) is left as it is.
func Env(env []string) ([]string, bool) {
	out := make([]string, 0, len(env)+1)
	found := false
	for _, kv := range env {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			out = append(out, kv)
			continue
		}
		found = true
		for _, s := range strings.Split(v, ",") {
			if strings.HasPrefix(s, "schedtrace=") {
				return env, false
			}
		}
		if v == "" {
			kv = "GODEBUG=" + Setting
		} else {
			kv += "," + Setting
		}
		out = append(out, kv)
	}
	if !found {
		out = append(out, "GODEBUG="+Setting)
	}
	return out, true
}

// Reexec replaces the process with the same program, arguments and
// environment plus Setting (same PID: a supervisor sees nothing), unless
// GODEBUG already names schedtrace. It returns only if it did not
// exec; the process then runs on with the runtime's default.
func Reexec() error {
	env, changed := Env(os.Environ())
	if !changed {
		return nil
	}
	// /proc/self/exe still opens a binary replaced or deleted since start.
	if err := syscall.Exec("/proc/self/exe", os.Args, env); err != nil {
		return fmt.Errorf("re-exec with GODEBUG=%s: %w", Setting, err)
	}
	return nil
}
