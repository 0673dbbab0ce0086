package imagecache

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A download is collected into a ring of aligned buffers; each full buffer
// is hashed by one goroutine and written by another while the next one
// fills. The file is written with O_DIRECT: hack/imagebench's profile
// showed buffered writes of a cold GiB costing ~2–3 s of CPU in the
// kernel (page-cache allocation and copy, on this VM host also the first
// touch of guest memory), against ~0.3 s for direct writes of the same
// bytes. A cached image is written once and read later by QEMU: the most
// keeping its pages would save is the first VM's reads of the blocks it
// boots from.
const (
	// sinkBufferSize is the size of one buffer and of each direct write.
	sinkBufferSize = 4 << 20
	// sinkBuffers is how many buffers are in flight between the receive,
	// the hash and the write (16 MiB per download).
	sinkBuffers = 4
	// directAlign is the alignment O_DIRECT wants of the buffer address,
	// file offset and length: 4 KiB covers every logical block size Linux
	// block devices use.
	directAlign = 4096
)

// createTemp creates a new file in dir whose name starts with prefix, for
// direct writes if the file system allows them (tmpfs, for one, may not).
func createTemp(dir, prefix string) (f *os.File, direct bool, err error) {
	for range 100 {
		var r [8]byte
		_, _ = rand.Read(r[:])
		name := filepath.Join(dir, prefix+hex.EncodeToString(r[:]))
		f, err = os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_DIRECT, 0o600)
		if errors.Is(err, unix.EINVAL) {
			f, err = os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			if err == nil {
				return f, false, nil
			}
		}
		if errors.Is(err, os.ErrExist) {
			continue
		}
		return f, err == nil, err
	}
	return nil, false, fmt.Errorf("create temporary file in %s: %w", dir, err)
}

// sink hashes and writes a download. Write is called from one goroutine
// (the receiver); Close ends it and returns the digest.
type sink struct {
	f      *os.File
	direct bool // written with O_DIRECT; cleared for the unaligned tail

	// Used by the writer goroutine only: direct writes go through async
	// (nil where AIO is unavailable or refused), at offset off; the file
	// is preallocated up to alloc, and trimmed to off at the end.
	async      *asyncWriter
	off, alloc int64
	// asyncWrites counts the buffers written through AIO.
	asyncWrites int

	bufs []slot
	cur  int // the slot being filled
	n    int64

	hashes, writes chan *slot
	sum            chan []byte
	written        chan struct{}

	closeOnce sync.Once
	digest    []byte

	mu  sync.Mutex
	err error // the writer's first error
}

// slot is one buffer, the bytes in it, and the two stages (hash, write)
// still reading it.
type slot struct {
	buf  []byte
	n    int
	busy sync.WaitGroup
}

func newSink(f *os.File, direct bool) *sink { return newSinkAIO(f, direct, true) }

// newSinkAIO is newSink with AIO for the direct writes only if useAIO
// (tests and benchmarks compare the two).
func newSinkAIO(f *os.File, direct, useAIO bool) *sink {
	s := &sink{
		f: f, direct: direct,
		bufs:    make([]slot, sinkBuffers),
		hashes:  make(chan *slot, sinkBuffers),
		writes:  make(chan *slot, sinkBuffers),
		sum:     make(chan []byte, 1),
		written: make(chan struct{}),
	}
	for i := range s.bufs {
		s.bufs[i].buf = alignedBuffer(sinkBufferSize)
	}
	if direct && useAIO {
		// Without AIO the writes are synchronous, as they always were.
		s.async, _ = newAsyncWriter(sinkBuffers)
	}
	go s.hash(sha256.New())
	go s.write()
	return s
}

// alignedBuffer is n bytes starting at a directAlign boundary.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	off := (directAlign - int(uintptr(unsafe.Pointer(&b[0]))%directAlign)) % directAlign
	return b[off : off+n : off+n]
}

// Write copies p into the ring, handing each full buffer on.
func (s *sink) Write(p []byte) error {
	if err := s.failed(); err != nil {
		return err
	}
	for len(p) > 0 {
		sl := &s.bufs[s.cur]
		c := copy(sl.buf[sl.n:], p)
		sl.n += c
		s.n += int64(c)
		p = p[c:]
		if sl.n == len(sl.buf) {
			s.dispatch()
		}
	}
	return nil
}

// dispatch hands the current buffer to the hasher and the writer and waits
// until the next one is free.
func (s *sink) dispatch() {
	sl := &s.bufs[s.cur]
	sl.busy.Add(2)
	s.hashes <- sl
	s.writes <- sl
	s.cur = (s.cur + 1) % len(s.bufs)
	next := &s.bufs[s.cur]
	next.busy.Wait()
	next.n = 0
}

// Close flushes the last, partial buffer and stops both goroutines. It
// returns the sha256 of everything written, and the writer's error if a
// write failed. Close must be called also when the download failed, so
// that the goroutines end; calls after the first return what it did.
func (s *sink) Close() (sum []byte, n int64, err error) {
	s.closeOnce.Do(func() {
		if s.bufs[s.cur].n > 0 {
			s.dispatch()
		}
		close(s.hashes)
		close(s.writes)
		<-s.written
		s.digest = <-s.sum
	})
	return s.digest, s.n, s.failed()
}

func (s *sink) hash(h hash.Hash) {
	for sl := range s.hashes {
		h.Write(sl.buf[:sl.n])
		sl.busy.Done()
	}
	s.sum <- h.Sum(nil)
}

func (s *sink) write() {
	defer close(s.written)
	if s.async != nil {
		s.writeAsync()
	}
	for sl := range s.writes {
		s.writeSlot(sl)
	}
	if s.alloc > s.off && s.failed() == nil {
		// Cut what preallocate reserved past the data.
		if err := s.f.Truncate(s.off); err != nil {
			s.fail(fmt.Errorf("trim %s: %w", s.f.Name(), err))
		}
	}
}

// writeSlot writes one buffer synchronously and frees it.
func (s *sink) writeSlot(sl *slot) {
	if s.failed() == nil {
		if err := s.writeOut(sl.buf[:sl.n]); err != nil {
			s.fail(fmt.Errorf("write %s: %w", s.f.Name(), err))
		}
	}
	sl.busy.Done()
}

// writeAsync submits each full buffer through AIO as it arrives, with up
// to len(s.bufs) in flight, and frees each buffer when its write is done:
// with several queued the disk never waits for the writer to notice a
// completion, which on a busy host (all Ps taken) may take a while. It
// returns at the end of the download, with nothing in flight, or early,
// for write to carry on synchronously: for the last, partial buffer
// (unaligned: see writeOut), or once AIO failed for a reason of its own.
func (s *sink) writeAsync() {
	defer func() {
		_ = s.async.Close()
		s.async = nil
	}()
	type write struct {
		sl  *slot
		off int64
	}
	inflight := map[uint64]write{}
	var next uint64
	// collect waits for at least one write and frees its buffer; false:
	// AIO failed, nothing is in flight any more, and writeAsync must stop.
	collect := func() bool {
		done, err := s.async.Wait()
		if err != nil {
			// Closing the context waits for the writes in flight
			// (io_destroy), after which their buffers can be reused.
			s.fail(fmt.Errorf("write %s: %w", s.f.Name(), err))
			_ = s.async.Close()
			for tag, w := range inflight {
				delete(inflight, tag)
				w.sl.busy.Done()
			}
			return false
		}
		for _, d := range done {
			w := inflight[d.tag]
			sl := w.sl
			delete(inflight, d.tag)
			switch {
			case errors.Is(d.err, unix.EINVAL):
				// The file system took the O_DIRECT open but refuses the
				// write (see writeOut): this buffer and the rest go
				// through the page cache.
				err := s.setDirect(false)
				if err == nil {
					_, err = s.f.WriteAt(sl.buf[:sl.n], w.off)
				}
				if err != nil {
					s.fail(fmt.Errorf("write %s: %w", s.f.Name(), err))
				}
			case d.err != nil:
				s.fail(fmt.Errorf("write %s: %w", s.f.Name(), d.err))
			case d.n < sl.n:
				s.fail(fmt.Errorf("write %s: short direct write, %d of %d bytes", s.f.Name(), d.n, sl.n))
			}
			s.asyncWrites++
			sl.busy.Done()
		}
		return true
	}
	drain := func() {
		for len(inflight) > 0 && collect() {
		}
	}
	defer drain()
	for {
		var sl *slot
		var ok bool
		switch {
		case len(inflight) == 0:
			sl, ok = <-s.writes
		case len(inflight) < s.async.depth:
			select {
			case sl, ok = <-s.writes:
			default:
				if !collect() {
					return
				}
				continue
			}
		default:
			if !collect() {
				return
			}
			continue
		}
		if !ok {
			return
		}
		if s.failed() != nil {
			sl.busy.Done()
			continue
		}
		if !s.direct || sl.n != len(sl.buf) {
			drain()
			s.writeSlot(sl)
			return
		}
		s.preallocate(s.off + int64(sl.n))
		if err := s.async.Submit(s.f, sl.buf[:sl.n], s.off, next); err != nil {
			// AIO itself refused (a file system or kernel without it):
			// this and later buffers go through pwrite.
			drain()
			s.writeSlot(sl)
			return
		}
		inflight[next] = write{sl, s.off}
		next++
		s.off += int64(sl.n)
	}
}

func (s *sink) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
}

// writeOut writes b after what was written before. Only the last buffer
// can be shorter than sinkBufferSize: its unaligned tail is written through
// the page cache.
func (s *sink) writeOut(b []byte) error {
	if s.direct {
		head := len(b) &^ (directAlign - 1)
		var n int
		if head > 0 {
			var err error
			if n, err = s.writeDirect(b[:head]); err != nil && !errors.Is(err, unix.EINVAL) {
				return err
			}
		}
		// EINVAL: the file system took the O_DIRECT open but refuses the
		// write; the rest goes through the page cache.
		b = b[n:]
		if len(b) == 0 {
			return nil
		}
		if err := s.setDirect(false); err != nil {
			return err
		}
	}
	n, err := s.f.WriteAt(b, s.off)
	s.off += int64(n)
	return err
}

// preallocStep is how far ahead of the direct writes the file is
// allocated (see preallocate).
const preallocStep = 64 << 20

// writeDirect writes b, aligned, at off with pwrite(2): the last, partial
// buffer, and every buffer where AIO is not to be had.
func (s *sink) writeDirect(b []byte) (int, error) {
	n, err := s.f.WriteAt(b, s.off)
	s.off += int64(n)
	return n, err
}

// preallocate makes the file at least end bytes long, in preallocStep
// steps, as unwritten extents: ext4 completes a direct write that extends
// the file inside io_submit, synchronously (the time the asyncWriter is
// there to take off the scheduler), and one within the file's size
// asynchronously. The writer trims the file to its data at the end. A
// file system without fallocate leaves the writes extending: still
// correct, only synchronous.
func (s *sink) preallocate(end int64) {
	if end <= s.alloc {
		return
	}
	next := s.alloc + preallocStep
	for next < end {
		next += preallocStep
	}
	rc, err := s.f.SyscallConn()
	if err == nil {
		cerr := rc.Control(func(fd uintptr) { err = unix.Fallocate(int(fd), 0, s.alloc, next-s.alloc) })
		err = errors.Join(err, cerr)
	}
	if err != nil {
		s.alloc = 1<<63 - 1 // do not try again
		return
	}
	s.alloc = next
}

func (s *sink) setDirect(on bool) error {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		if err != nil {
			ferr = err
			return
		}
		if on {
			fl |= unix.O_DIRECT
		} else {
			fl &^= unix.O_DIRECT
		}
		_, ferr = unix.FcntlInt(fd, unix.F_SETFL, fl)
	}); err != nil {
		return err
	}
	if ferr != nil {
		return fmt.Errorf("set O_DIRECT=%v on %s: %w", on, s.f.Name(), ferr)
	}
	s.direct = on
	return nil
}

func (s *sink) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
