package main

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// pacer sleeps one open-loop client until its next scheduled send, on a
// timerfd read through the runtime's netpoller.
//
// time.Sleep wakes an idle Go process up to a millisecond late: it waits for
// its next timer in epoll_wait, whose timeout is in whole milliseconds
// (runtime/netpoll_epoll.go rounds a wait under 1 ms up to 1 ms and
// truncates longer ones, so a wait of 5.3 ms wakes at 5 ms and then sleeps a
// whole millisecond more). The open-loop runs count latency from the
// scheduled send time, so that the generator's own lateness is never hidden
// (no coordinated omission), and with time.Sleep that lateness was most of
// both servers' latency at 1,000 req/s. A timerfd fires on the kernel's
// high-resolution timer and wakes epoll_wait as any readable socket does,
// whatever its timeout; the goroutine waits parked, holding no thread or P
// (a nanosleep(2) would hold both, and with two Ps two clients sleeping at
// once would keep every other client from reading its answer).
type pacer struct {
	fd int
	f  *os.File
}

func newPacer() (*pacer, error) {
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("timerfd: %w", err)
	}
	// Non-blocking, so os.File reads it through the netpoller.
	return &pacer{fd: fd, f: os.NewFile(uintptr(fd), "pacer")}, nil
}

// sleepUntil returns at t or just after it, at once if t has passed.
func (p *pacer) sleepUntil(t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return nil
	}
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(int64(d))}
	if err := unix.TimerfdSettime(p.fd, 0, &spec, nil); err != nil {
		return fmt.Errorf("timerfd: %w", err)
	}
	var expirations [8]byte
	if _, err := p.f.Read(expirations[:]); err != nil {
		return fmt.Errorf("timerfd: %w", err)
	}
	return nil
}

func (p *pacer) Close() error { return p.f.Close() }
