package imagecache

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"testing"
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
