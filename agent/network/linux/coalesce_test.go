package linux

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// TestCoalescerSharesRunsStartedAfterTheCall: callers arriving while a run
// is under way share one later run (never the one under way, which may
// have measured the host before they asked); each gets that run's error.
func TestCoalescerSharesRunsStartedAfterTheCall(t *testing.T) {
	var c coalescer[string]
	var runs atomic.Int32
	release := make(chan struct{})
	started := make(chan struct{})
	first := make(chan error, 1)
	go func() {
		first <- c.do("br", func() error {
			runs.Add(1)
			close(started)
			<-release
			return nil
		})
	}()
	<-started

	const waiters = 9
	var wg sync.WaitGroup
	errs := make([]error, waiters)
	ran := make([]int32, waiters)
	boom := errors.New("second run failed")
	for i := range waiters {
		wg.Go(func() {
			errs[i] = c.do("br", func() error {
				ran[i] = runs.Add(1)
				return boom
			})
		})
	}
	// Every waiter is queued behind the first run before it ends.
	for {
		c.mu.Lock()
		n := c.next["br"]
		queued := n != nil && n.callers == waiters
		c.mu.Unlock()
		if queued {
			break
		}
		runtime.Gosched()
	}
	close(release)
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatalf("first run: %v", err)
	}
	if got := runs.Load(); got != 2 {
		t.Fatalf("%d runs for 1 + %d concurrent callers, want 2", got, waiters)
	}
	for i, err := range errs {
		if !errors.Is(err, boom) {
			t.Errorf("waiter %d: error %v, want the second run's", i, err)
		}
	}
	// Another key is not held up, and a later call runs afresh.
	if err := c.do("other", func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if err := c.do("br", func() error { runs.Add(1); return nil }); err != nil || runs.Load() != 3 {
		t.Fatalf("a call after the others ended: err %v, runs %d, want a third run", err, runs.Load())
	}
}
