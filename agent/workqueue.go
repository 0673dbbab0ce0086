package agent

import (
	"sync"
	"time"
)

// workQueue is a keyed work queue in the controller-runtime style: a key
// waiting to be processed is held once however often it is added, a key is
// never processed by two workers at once, and a key added while it is being
// processed is processed again afterwards. Failed keys come back after an
// exponential backoff with a cap.
type workQueue struct {
	mu         sync.Mutex
	cond       *sync.Cond
	queue      []string
	queued     map[string]bool
	processing map[string]bool
	dirty      map[string]bool // added again while processing
	failures   map[string]int
	timers     map[string]*time.Timer
	shutdown   bool

	baseDelay, maxDelay time.Duration
}

func newWorkQueue(baseDelay, maxDelay time.Duration) *workQueue {
	q := &workQueue{
		queued:     map[string]bool{},
		processing: map[string]bool{},
		dirty:      map[string]bool{},
		failures:   map[string]int{},
		timers:     map[string]*time.Timer{},
		baseDelay:  baseDelay,
		maxDelay:   maxDelay,
	}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add makes key due now.
func (q *workQueue) Add(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.addLocked(key)
}

func (q *workQueue) addLocked(key string) {
	if q.shutdown {
		return
	}
	if t, ok := q.timers[key]; ok {
		t.Stop()
		delete(q.timers, key)
	}
	if q.processing[key] {
		q.dirty[key] = true
		return
	}
	if q.queued[key] {
		return
	}
	q.queued[key] = true
	q.queue = append(q.queue, key)
	q.cond.Signal()
}

// AddAfter makes key due after d, unless it becomes due earlier.
func (q *workQueue) AddAfter(key string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown || q.queued[key] {
		return
	}
	if t, ok := q.timers[key]; ok {
		t.Stop()
	}
	q.timers[key] = time.AfterFunc(d, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		delete(q.timers, key)
		q.addLocked(key)
	})
}

// Get blocks until a key is due and marks it processing. ok is false once
// the queue is shut down.
func (q *workQueue) Get() (key string, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.queue) == 0 && !q.shutdown {
		q.cond.Wait()
	}
	if q.shutdown {
		return "", false
	}
	key = q.queue[0]
	q.queue = q.queue[1:]
	delete(q.queued, key)
	q.processing[key] = true
	return key, true
}

// Done ends the processing of key. err != nil schedules a retry with backoff;
// requeueAfter > 0 schedules a check later (e.g. a deadline).
func (q *workQueue) Done(key string, err error, requeueAfter time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.processing, key)
	if err != nil {
		n := q.failures[key]
		q.failures[key] = n + 1
		requeueAfter = q.backoff(n)
		// A failed key waits out its backoff even if events arrived
		// meanwhile: the retry reads the latest state anyway.
		delete(q.dirty, key)
	} else {
		delete(q.failures, key)
	}
	if q.dirty[key] {
		delete(q.dirty, key)
		q.addLocked(key)
		return
	}
	if requeueAfter > 0 && !q.shutdown {
		q.mu.Unlock()
		q.AddAfter(key, requeueAfter)
		q.mu.Lock()
	}
}

// Failures is how many times in a row key has failed.
func (q *workQueue) Failures(key string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.failures[key]
}

func (q *workQueue) backoff(failures int) time.Duration {
	d := q.baseDelay
	for i := 0; i < failures && d < q.maxDelay; i++ {
		d *= 2
	}
	if d > q.maxDelay {
		d = q.maxDelay
	}
	return d
}

// ShutDown wakes every Get with ok=false.
func (q *workQueue) ShutDown() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.shutdown = true
	for _, t := range q.timers {
		t.Stop()
	}
	q.cond.Broadcast()
}

// Stats are the queue's depth (keys due, not yet handed to a worker) and
// the keys whose last processing failed (waiting out a backoff or retried).
func (q *workQueue) Stats() (due, failing int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.queue), len(q.failures)
}
