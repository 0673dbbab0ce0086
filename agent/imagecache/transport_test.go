package imagecache

import "testing"

// Every size gets a buffer of that length; sizes up to 1 MiB come from the
// smallest power-of-two class that holds them and are reused after Put,
// larger ones are made to measure and left to the collector.
func TestDirtyPoolSizes(t *testing.T) {
	p := newDirtyPool()
	for _, tc := range []struct{ n, capacity int }{
		{0, 256}, {1, 256}, {256, 256}, {257, 512}, {9, 256}, {16384, 16384}, {16385, 32768}, {1 << 20, 1 << 20}, {1<<20 + 1, 1<<20 + 1},
	} {
		b := p.Get(tc.n)
		if len(*b) != tc.n || cap(*b) != tc.capacity {
			t.Fatalf("Get(%d): len %d cap %d, want len %d cap %d", tc.n, len(*b), cap(*b), tc.n, tc.capacity)
		}
		p.Put(b)
	}
	// A buffer put back is handed out again with its old contents (not
	// cleared: whoever gets it overwrites it in full).
	b := p.Get(16384)
	(*b)[0] = 42
	p.Put(b)
	for range 100 { // sync.Pool may drop an entry; it rarely drops all
		c := p.Get(16000)
		if &(*c)[:1][0] == &(*b)[:1][0] {
			if (*c)[0] != 42 || len(*c) != 16000 {
				t.Fatalf("reused buffer: len %d, first byte %d", len(*c), (*c)[0])
			}
			return
		}
		p.Put(c)
	}
	t.Log("the pool never handed the buffer back (sync.Pool dropped it)")
}

// A buffer that is not one of the pool's (not a power of two, or too
// small) is not kept, so Get never returns one shorter than asked.
func TestDirtyPoolRefusesForeignBuffers(t *testing.T) {
	p := newDirtyPool()
	for _, n := range []int{100, 300, 1<<20 + 4096} {
		b := make([]byte, n)
		p.Put(&b)
	}
	for _, n := range []int{200, 256, 512, 1 << 20} {
		if b := p.Get(n); len(*b) != n || cap(*b) < n {
			t.Fatalf("Get(%d): len %d cap %d", n, len(*b), cap(*b))
		}
	}
}
