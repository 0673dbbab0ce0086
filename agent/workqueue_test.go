package agent

import (
	"errors"
	"sync"
	"testing"
	"time"
)

func TestWorkQueueDeduplicatesWaitingKeys(t *testing.T) {
	q := newWorkQueue(time.Millisecond, time.Second)
	q.Add("a")
	q.Add("a")
	q.Add("b")
	k1, _ := q.Get()
	k2, _ := q.Get()
	if k1 != "a" || k2 != "b" {
		t.Fatalf("got %q %q, want a b", k1, k2)
	}
	q.mu.Lock()
	n := len(q.queue)
	q.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d keys still queued, want 0", n)
	}
}

func TestWorkQueueNeverRunsAKeyTwiceAtOnce(t *testing.T) {
	q := newWorkQueue(time.Millisecond, time.Second)
	q.Add("a")
	k, _ := q.Get()
	q.Add(k) // arrives while processing: must wait for Done
	got := make(chan string, 1)
	go func() {
		k, _ := q.Get()
		got <- k
	}()
	select {
	case <-got:
		t.Fatal("key handed out while still processing")
	case <-time.After(50 * time.Millisecond):
	}
	q.Done(k, nil, 0)
	select {
	case k := <-got:
		if k != "a" {
			t.Fatalf("got %q", k)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("dirty key not requeued after Done")
	}
}

func TestWorkQueueBacksOffAndResets(t *testing.T) {
	q := newWorkQueue(10*time.Millisecond, 40*time.Millisecond)
	for i, want := range []time.Duration{10, 20, 40, 40} {
		if got := q.backoff(i); got != want*time.Millisecond {
			t.Errorf("backoff(%d) = %v, want %v", i, got, want*time.Millisecond)
		}
	}
	q.Add("a")
	k, _ := q.Get()
	q.Done(k, errors.New("boom"), 0)
	if q.Failures("a") != 1 {
		t.Fatalf("failures = %d, want 1", q.Failures("a"))
	}
	k, _ = q.Get() // comes back after the backoff
	q.Done(k, nil, 0)
	if q.Failures("a") != 0 {
		t.Fatalf("failures not reset after success")
	}
}

func TestWorkQueueShutDownReleasesWorkers(t *testing.T) {
	q := newWorkQueue(time.Millisecond, time.Second)
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, ok := q.Get(); ok {
				t.Error("Get returned a key after shutdown")
			}
		}()
	}
	q.ShutDown()
	wg.Wait()
}
