package agent

import (
	"context"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A reconcile pass's CPU time, beside its wall time (issue 15, section 4).
// On a host crowded with guests (50 under TCG keep ~76 threads runnable
// on 2 cores) a pass's wall time is mostly waiting for a CPU, so "the
// pass does not grow with the VMs" can only be judged on the CPU it uses.
//
// Go has no per-goroutine CPU clock, and the two process-wide ones are
// wrong for one pass: getrusage(RUSAGE_SELF) or runtime/metrics around a
// pass count whatever else the process did meanwhile (other workers, the
// streams, GC workers, and in the all-in-one etcd and the API), and a
// thread's clock (CLOCK_THREAD_CPUTIME_ID) around an unlocked goroutine
// counts the other goroutines that thread ran while the pass was parked,
// and misses the pass's time on the threads it hopped to. So the pass's
// goroutine is locked to its thread (runtime.LockOSThread): no other
// goroutine runs there until it unlocks, and the thread's clock then holds
// the pass alone, user and system time (the netlink, nftables and file
// syscalls it makes are its own). The goroutines a pass starts (the disk
// step) measure themselves the same way into the pass's meter. Not
// counted: work other goroutines do for the pass — go-libvirt's reader
// decoding replies, gRPC's transport — and other processes' (libvirtd).
// The price of the lock is a thread hand-off each time the pass blocks
// (a few µs; the fake-hypervisor pass is ~150 µs of CPU).

// cpuMeter sums the CPU time of a pass's goroutines.
type cpuMeter struct{ ns atomic.Int64 }

type cpuMeterKey struct{}

// measureCPU runs fn on a locked thread and adds its CPU time to the
// meter in ctx (when there is one; fn runs anyway).
func measureCPU(ctx context.Context, fn func()) {
	m, _ := ctx.Value(cpuMeterKey{}).(*cpuMeter)
	if m == nil {
		fn()
		return
	}
	m.ns.Add(int64(onThisThread(fn)))
}

// onThisThread runs fn locked to the calling goroutine's thread and
// returns the thread's CPU time over it.
func onThisThread(fn func()) time.Duration {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	start := threadCPU()
	fn()
	return threadCPU() - start
}

// threadCPU is the calling thread's CPU time, user plus system.
func threadCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}
