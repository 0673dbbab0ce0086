package scheduler

import (
	"math/rand/v2"
	"sync"
	"time"
)

// queue is a set of VM ids waiting for a worker, in the manner of
// client-go's workqueue: an id is queued at most once, is never handed to
// two workers at once, and if it is added again while a worker holds it, it
// is queued again when the worker is done (level-triggered: the worker
// re-reads the VM, so coalescing repeated adds loses nothing).
//
// Get hands out a random id among the oldest `window` ones rather than
// strictly the oldest: scheduler replicas fed by the same watch then mostly
// work on different VMs instead of racing for the same one, while no id
// waits behind more than `window` newer ones.
type queue struct {
	mu         sync.Mutex
	cond       *sync.Cond
	items      []string
	queued     map[string]bool
	processing map[string]bool
	dirty      map[string]bool
	window     int
	rng        *rand.Rand
	closed     bool
}

func newQueue(window int) *queue {
	q := &queue{
		queued: map[string]bool{}, processing: map[string]bool{}, dirty: map[string]bool{},
		window: window, rng: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
	}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add queues id unless it is queued already.
func (q *queue) Add(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.queued[id] {
		return
	}
	if q.processing[id] {
		q.dirty[id] = true
		return
	}
	q.queued[id] = true
	q.items = append(q.items, id)
	q.cond.Signal()
}

// AddAfter queues id after d.
func (q *queue) AddAfter(id string, d time.Duration) {
	if d <= 0 {
		q.Add(id)
		return
	}
	time.AfterFunc(d, func() { q.Add(id) })
}

// Get blocks until an id is available or the queue is closed.
func (q *queue) Get() (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.items) == 0 && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		return "", false
	}
	i := 0
	if w := min(len(q.items), q.window); w > 1 {
		i = q.rng.IntN(w)
	}
	id := q.items[i]
	q.items[i] = q.items[0]
	q.items[0] = ""
	q.items = q.items[1:]
	delete(q.queued, id)
	q.processing[id] = true
	return id, true
}

// Done ends a worker's hold on id and requeues it if it was added meanwhile.
func (q *queue) Done(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.processing, id)
	if q.dirty[id] {
		delete(q.dirty, id)
		q.queued[id] = true
		q.items = append(q.items, id)
		q.cond.Signal()
	}
}

// Len is the number of queued ids.
func (q *queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// Close wakes every Get with ok == false.
func (q *queue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.cond.Broadcast()
}
