package imagecache

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"
)

// DialOptions are for the agent's connection to the API that the cache
// downloads over. Each saves a pass over every byte received
// (hack/imagebench's profile: together ~0.1–0.15 s of CPU per GiB):
//
//   - no read buffer: gRPC's framer reads from the TLS connection into its
//     frame buffers directly, instead of through a 32 KiB bufio.Reader
//     that copies every byte once more (TLS keeps a record buffer of its
//     own, so this adds no syscalls);
//   - a buffer pool that does not zero what it hands out: gRPC's default
//     pool clears every 16 KiB frame buffer before the framer overwrites
//     it in full with io.ReadFull (grpc-go does the same for its own
//     HTTP/2 write buffers; see dirtyPool);
//   - fixed HTTP/2 flow-control windows (a stream may have 8 MiB in
//     flight, the connection 16 MiB: four of the cache's 4 MiB buffers,
//     twice over) instead of gRPC's bandwidth-delay estimate, which starts
//     at 64 KiB and pings the API while it grows the window, each ping a
//     TLS record and a wake-up on both ends. In paired runs the fetch took
//     ~8 % less CPU per GiB with them (docs/benchmarks.md, "Cold image
//     delivery"); the estimate's own ceiling is the same 16 MiB, so a slow
//     reader holds no more unread data than it could before.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithReadBufferSize(0),
		experimental.WithBufferPool(receivePool),
		grpc.WithInitialWindowSize(streamWindow),
		grpc.WithInitialConnWindowSize(connWindow),
	}
}

// The flow-control windows DialOptions sets.
const (
	streamWindow = 8 << 20
	connWindow   = 16 << 20
)

// receivePool is the pool DialOptions gives gRPC.
var receivePool = newDirtyPool()

// dirtyPool is a mem.BufferPool of power-of-two size classes up to 1 MiB
// (gRPC's own tiers), whose buffers keep their old contents. That is safe
// where gRPC uses it: a receive buffer is filled in full by io.ReadFull
// before anything reads it, and a send buffer is marshalled into in full;
// neither hands out bytes it did not write.
type dirtyPool struct {
	classes [dirtyPoolClasses]sync.Pool
}

const (
	dirtyPoolMinShift = 8  // 256 B
	dirtyPoolMaxShift = 20 // 1 MiB
	dirtyPoolClasses  = dirtyPoolMaxShift - dirtyPoolMinShift + 1
)

func newDirtyPool() *dirtyPool { return &dirtyPool{} }

// class is the index of the smallest size class that holds n bytes, or -1
// if none does.
func (p *dirtyPool) class(n int) int {
	if n > 1<<dirtyPoolMaxShift {
		return -1
	}
	shift := bits.Len(uint(max(n, 1) - 1))
	return max(shift, dirtyPoolMinShift) - dirtyPoolMinShift
}

func (p *dirtyPool) Get(n int) *[]byte {
	c := p.class(n)
	if c < 0 {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+dirtyPoolMinShift))
	return &b
}

func (p *dirtyPool) Put(b *[]byte) {
	size := cap(*b)
	// Only buffers of exactly a class's size came from Get; others
	// (larger than the largest class) are left to the collector.
	if size&(size-1) != 0 {
		return
	}
	if c := p.class(size); c >= 0 && size >= 1<<dirtyPoolMinShift {
		p.classes[c].Put(b)
	}
}
