package main

import (
	"syscall"
	"time"
)

// netpollSlack is how late the Go runtime's own timers may fire when the
// process is idle: an idle process waits for its next timer in epoll_wait,
// whose timeout is in whole milliseconds (runtime/netpoll_epoll.go rounds a
// wait under 1 ms up to 1 ms and truncates longer ones, so a wait of 5.3 ms
// wakes at 5 ms and then sleeps another whole millisecond).
const netpollSlack = 2 * time.Millisecond

// sleepUntil returns at t or just after it (the kernel's timer slack, 50 µs
// by default), not up to a millisecond after it as time.Sleep does in an
// idle process. The open-loop runs count latency from the scheduled send
// time, so that the generator's own lateness is never hidden (no coordinated
// omission); with time.Sleep alone that lateness was 1.2–1.5 ms at p99 and
// about half a millisecond at p50 for both servers, most of what was
// measured at 1,000 req/s. The long part of the wait is still the runtime's
// timer; only the last netpollSlack is a nanosleep(2), which holds the
// goroutine's thread (not its P: the runtime hands the P on if there is other
// work) and costs neither server anything.
func sleepUntil(t time.Time) {
	if d := time.Until(t) - netpollSlack; d > 0 {
		time.Sleep(d)
	}
	for {
		d := time.Until(t)
		if d <= 0 {
			return
		}
		ts := syscall.NsecToTimespec(int64(d))
		// EINTR (the runtime preempts with signals) ends it early: the loop
		// sleeps the rest.
		_ = syscall.Nanosleep(&ts, nil)
	}
}
