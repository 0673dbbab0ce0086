package imagecache

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// asyncWriter writes a file with Linux native AIO (io_submit), so that a
// direct write does not hold one of the Go scheduler's Ps while the disk
// works. A plain write(2) of a 4 MiB O_DIRECT buffer blocks its thread for
// the device's round trip (~3–5 ms here, ~1.2 s per GiB in
// hack/imagebench), and the runtime hands the thread's P to other
// goroutines only when sysmon notices, which it often does not: with
// GOMAXPROCS=1 a hashing goroutine beside such a writer got a third of
// the CPU (docs/benchmarks.md, "Cold image delivery"). io_submit queues
// the write and returns; the writer then waits for the completion on an
// eventfd through the netpoller, parked like a goroutine reading a socket,
// and the receive, TLS and hashing of the download run on both cores.
//
// ext4 runs a direct write that extends the file synchronously inside
// io_submit, so the sink preallocates ahead of its writes (see
// sink.preallocate); a write that ends up synchronous anyway is still
// correct, only not faster.
type asyncWriter struct {
	ctx  uintptr  // aio_context_t
	done *os.File // eventfd the kernel signals on each completion
	// efd is done's descriptor, kept here: done.Fd() would switch the
	// eventfd to blocking mode and take it out of the netpoller.
	efd   int
	depth int
}

// iocb and ioEvent are the kernel's struct iocb and struct io_event
// (include/uapi/linux/aio_abi.h, little-endian 64-bit layout).
type iocb struct {
	data      uint64
	key       uint32
	rwFlags   int32
	opcode    uint16
	reqprio   int16
	fildes    uint32
	buf       uint64
	nbytes    uint64
	offset    int64
	reserved2 uint64
	flags     uint32
	resfd     uint32
}

type ioEvent struct {
	data, obj uint64
	res, res2 int64
}

const (
	iocbCmdPwrite = 1
	iocbFlagResfd = 1 << 0
)

// newAsyncWriter sets up an AIO context for up to depth writes in flight.
// It fails where AIO is not available (a kernel without it, fs.aio-max-nr
// used up); the caller then writes synchronously.
func newAsyncWriter(depth int) (*asyncWriter, error) {
	var ctx uintptr
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, uintptr(depth), uintptr(unsafe.Pointer(&ctx)), 0); e != 0 {
		return nil, fmt.Errorf("io_setup: %w", e)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_, _, _ = unix.Syscall(unix.SYS_IO_DESTROY, ctx, 0, 0)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// Non-blocking, so os.NewFile registers it with the netpoller.
	return &asyncWriter{ctx: ctx, done: os.NewFile(uintptr(efd), "aio-eventfd"), efd: efd, depth: depth}, nil
}

// asyncDone is one completed write: the tag it was submitted with, and
// the bytes written or the error.
type asyncDone struct {
	tag uint64
	n   int
	err error
}

// Submit queues a write of b to f at off and returns; Wait reports its
// completion under tag. b must stay untouched until then. At most depth
// writes may be in flight.
func (a *asyncWriter) Submit(f *os.File, b []byte, off int64, tag uint64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cb := &iocb{
			data: tag, opcode: iocbCmdPwrite, fildes: uint32(fd),
			buf: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))), nbytes: uint64(len(b)), offset: off,
			flags: iocbFlagResfd, resfd: uint32(a.efd),
		}
		cbs := [1]*iocb{cb}
		for {
			_, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, a.ctx, 1, uintptr(unsafe.Pointer(&cbs[0])))
			if e == unix.EINTR {
				continue
			}
			if e != 0 {
				serr = e
			}
			break
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("io_submit: %w", serr)
	}
	return nil
}

// Wait returns at least one completed write, parked in the netpoller until
// one completes. Call it only with a write in flight.
func (a *asyncWriter) Wait() ([]asyncDone, error) {
	events := make([]ioEvent, a.depth)
	zero := unix.Timespec{}
	for {
		var count [8]byte
		if _, err := a.done.Read(count[:]); err != nil {
			return nil, fmt.Errorf("wait for a write: %w", err)
		}
		// The kernel adds an event to the ring before it signals the
		// eventfd; an event collected by an earlier Wait leaves a count
		// behind with no event, hence the zero timeout and the loop.
		n, _, e := unix.Syscall6(unix.SYS_IO_GETEVENTS, a.ctx, 0, uintptr(len(events)), uintptr(unsafe.Pointer(&events[0])), uintptr(unsafe.Pointer(&zero)), 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return nil, fmt.Errorf("io_getevents: %w", e)
		}
		if n == 0 {
			continue
		}
		out := make([]asyncDone, n)
		for i, ev := range events[:n] {
			out[i] = asyncDone{tag: ev.data, n: max(int(ev.res), 0)}
			if ev.res < 0 {
				out[i].err = unix.Errno(-ev.res)
			}
		}
		return out, nil
	}
}

// WriteAt writes b to f at off and returns when the write completed; no
// other write may be in flight.
func (a *asyncWriter) WriteAt(f *os.File, b []byte, off int64) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if err := a.Submit(f, b, off, 0); err != nil {
		return 0, err
	}
	done, err := a.Wait()
	if err != nil {
		return 0, err
	}
	return done[0].n, done[0].err
}

// Close releases the AIO context, waiting for any write still in flight
// (io_destroy does), and the eventfd. Calls after the first do nothing.
func (a *asyncWriter) Close() error {
	if a.ctx == 0 {
		return nil
	}
	_, _, e := unix.Syscall(unix.SYS_IO_DESTROY, a.ctx, 0, 0)
	a.ctx = 0
	cerr := a.done.Close()
	if e != 0 {
		return fmt.Errorf("io_destroy: %w", e)
	}
	return cerr
}
