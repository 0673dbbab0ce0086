package imagecache

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSinkWritesEveryByteOnce writes through the sink with and without
// O_DIRECT, at sizes around the alignment and the buffer size and past
// the end of the ring, in receive chunks that do not line up with either,
// and checks the file and the digest against the bytes.
func TestSinkWritesEveryByteOnce(t *testing.T) {
	data := make([]byte, (sinkBuffers+2)*sinkBufferSize+777)
	if _, err := io.ReadFull(rand.Reader, data); err != nil {
		t.Fatal(err)
	}
	sizes := []int{0, 1, directAlign - 1, directAlign, directAlign + 1, sinkBufferSize - 1, sinkBufferSize, sinkBufferSize + 1, len(data)}
	for _, wantDirect := range []bool{true, false} {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("direct=%v/%d", wantDirect, size), func(t *testing.T) {
				f, direct, err := createTemp(t.TempDir(), "sink-")
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if wantDirect && !direct {
					t.Skip("this file system refuses O_DIRECT")
				}
				s := newSink(f, direct && wantDirect)
				if direct && !wantDirect {
					if err := s.setDirect(false); err != nil {
						t.Fatal(err)
					}
				}
				for b := data[:size]; len(b) > 0; {
					n := min(len(b), 65536+13) // gRPC messages: any size
					if err := s.Write(b[:n]); err != nil {
						t.Fatal(err)
					}
					b = b[n:]
				}
				sum, n, err := s.Close()
				if err != nil {
					t.Fatal(err)
				}
				if full := size / sinkBufferSize; wantDirect && full > 0 && s.asyncWrites != full && aioAvailable(t) {
					t.Errorf("%d of %d full buffers written through AIO", s.asyncWrites, full)
				}
				want := sha256.Sum256(data[:size])
				if n != int64(size) || !bytes.Equal(sum, want[:]) {
					t.Errorf("sink: %d bytes, sha256 %x; want %d, %x", n, sum, size, want)
				}
				got, err := os.ReadFile(f.Name())
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, data[:size]) {
					t.Errorf("file holds %d bytes that differ from the %d written", len(got), size)
				}
			})
		}
	}
}

// TestSinkReportsWriteErrors: a failed write (here: a file opened read
// only) is returned, and Close still ends both goroutines.
func TestSinkReportsWriteErrors(t *testing.T) {
	f, err := os.Create(t.TempDir() + "/ro")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	ro, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	s := newSink(ro, false)
	chunk := make([]byte, sinkBufferSize)
	var werr error
	for range sinkBuffers + 2 {
		if werr = s.Write(chunk); werr != nil {
			break
		}
	}
	if _, _, err := s.Close(); err == nil {
		t.Fatal("Close after failed writes: no error")
	}
	if werr == nil {
		t.Error("Write kept accepting data after the writer failed")
	}
}

func aioAvailable(t testing.TB) bool {
	a, err := newAsyncWriter(1)
	if err != nil {
		t.Logf("no AIO here: %v", err)
		return false
	}
	a.Close()
	return true
}

// directFileWithAIO is a new file open with O_DIRECT and an asyncWriter of
// the given depth, both closed when the test ends; it skips the test where
// either is not to be had.
func directFileWithAIO(t *testing.T, depth int) (*os.File, *asyncWriter) {
	t.Helper()
	f, direct, err := createTemp(t.TempDir(), "aio-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if !direct {
		t.Skip("this file system refuses O_DIRECT")
	}
	a, err := newAsyncWriter(depth)
	if err != nil {
		t.Skipf("no AIO here: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return f, a
}

// TestAsyncWriterWritesAtOffsets: a direct write through AIO lands at its
// offset and is complete when WriteAt returns, in any order, and what the
// kernel refuses (an unaligned buffer with O_DIRECT, a file not open for
// writing) comes back as the error.
func TestAsyncWriterWritesAtOffsets(t *testing.T) {
	f, a := directFileWithAIO(t, 1)
	first, second := alignedBuffer(2*directAlign), alignedBuffer(directAlign)
	for i := range first {
		first[i] = 'a'
	}
	for i := range second {
		second[i] = 'b'
	}
	// The second block first: the file grows past a hole, then the hole
	// is filled.
	if n, err := a.WriteAt(f, second, 2*directAlign); err != nil || n != len(second) {
		t.Fatalf("write at %d: %d, %v", 2*directAlign, n, err)
	}
	if n, err := a.WriteAt(f, first, 0); err != nil || n != len(first) {
		t.Fatalf("write at 0: %d, %v", n, err)
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if want := append(append([]byte{}, first...), second...); !bytes.Equal(got, want) {
		t.Errorf("file holds %d bytes, not the %d written in place", len(got), len(want))
	}

	if _, err := a.WriteAt(f, first[1:directAlign+1], 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unaligned direct write: %v, want EINVAL", err)
	}
	ro, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := a.WriteAt(ro, second, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("write to a file open for reading: %v, want EBADF", err)
	}
}

// BenchmarkSinkDirect puts 256 MiB through the sink into a file written
// with O_DIRECT, through AIO and (as before it) with pwrite(2), in a
// directory of the file system given by IMAGECACHE_BENCH_DIR (default:
// the test's temporary directory). Run it with -cpu 1,2: with one P a
// pwrite that blocks for the disk holds it, and the hash waits.
func BenchmarkSinkDirect(b *testing.B) {
	chunk := make([]byte, 1<<20)
	if _, err := io.ReadFull(rand.Reader, chunk); err != nil {
		b.Fatal(err)
	}
	dir := os.Getenv("IMAGECACHE_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	}
	for _, mode := range []string{"aio", "pwrite"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(256 << 20)
			for range b.N {
				f, direct, err := createTemp(dir, "bench-")
				if err != nil {
					b.Fatal(err)
				}
				if !direct {
					b.Skip("this file system refuses O_DIRECT")
				}
				if mode == "aio" && !aioAvailable(b) {
					b.Skip("no AIO")
				}
				s := newSinkAIO(f, true, mode == "aio")
				for range 256 {
					if err := s.Write(chunk); err != nil {
						b.Fatal(err)
					}
				}
				if _, _, err := s.Close(); err != nil {
					b.Fatal(err)
				}
				f.Close()
				os.Remove(f.Name())
			}
		})
	}
}

// TestAsyncWriterWithWritesInFlight: several writes submitted at once each
// complete once, under their own tag, and land at their own offsets.
func TestAsyncWriterWithWritesInFlight(t *testing.T) {
	const depth = 4
	f, a := directFileWithAIO(t, depth)
	want := make([]byte, depth*sinkBufferSize)
	if _, err := io.ReadFull(rand.Reader, want); err != nil {
		t.Fatal(err)
	}
	bufs := make([][]byte, depth)
	for i := range bufs {
		bufs[i] = alignedBuffer(sinkBufferSize)
		copy(bufs[i], want[i*sinkBufferSize:])
		if err := a.Submit(f, bufs[i], int64(i*sinkBufferSize), uint64(100+i)); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[uint64]bool{}
	for len(seen) < depth {
		done, err := a.Wait()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range done {
			if d.err != nil || d.n != sinkBufferSize || d.tag < 100 || d.tag >= 100+depth || seen[d.tag] {
				t.Fatalf("completion %+v (seen before: %v)", d, seen[d.tag])
			}
			seen[d.tag] = true
		}
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("file holds %d bytes that differ from the %d written", len(got), len(want))
	}
}
