package linux

import "sync"

// coalescer lets concurrent callers of the same idempotent operation share
// one run of it. Ten VMs of one network created at once each ensure the
// network's bridge; verifying a bridge reads the whole nftables ruleset (a
// few netlink dumps, ~10 ms on a loaded host) under the Manager's lock, so
// ten serial runs were most of the agent's network step (hack/agentbench).
//
// Unlike singleflight, a caller never joins a run that started before it
// arrived: that run may have measured the host before the caller's reason
// to ask (a rule someone deleted just now). It joins the next run instead,
// which starts once the current one ends and serves every caller that
// arrived meanwhile. So each caller's answer comes from a measurement taken
// after its call, and N concurrent callers cost at most two runs.
type coalescer[K comparable] struct {
	mu      sync.Mutex
	running map[K]*coalescedRun
	next    map[K]*coalescedRun
}

type coalescedRun struct {
	done    chan struct{}
	err     error
	callers int // guarded by coalescer.mu
}

// do runs fn for key, or waits for a run of it that starts after this call.
func (c *coalescer[K]) do(key K, fn func() error) error {
	c.mu.Lock()
	if c.running == nil {
		c.running, c.next = map[K]*coalescedRun{}, map[K]*coalescedRun{}
	}
	if n := c.next[key]; n != nil {
		n.callers++
		c.mu.Unlock()
		<-n.done
		return n.err
	}
	run := &coalescedRun{done: make(chan struct{}), callers: 1}
	if cur := c.running[key]; cur != nil {
		// Others arriving until cur ends join run; this caller starts it.
		c.next[key] = run
		c.mu.Unlock()
		<-cur.done
		c.mu.Lock()
		delete(c.next, key)
	}
	c.running[key] = run
	c.mu.Unlock()

	run.err = fn()

	c.mu.Lock()
	delete(c.running, key)
	c.mu.Unlock()
	close(run.done)
	return run.err
}
