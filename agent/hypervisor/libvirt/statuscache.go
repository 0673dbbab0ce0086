package libvirt

import (
	"sync"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
)

// Why Status is served from a cache: the agent observes every VM's domain
// on every reconcile pass (each VM once a minute at rest, more on events),
// and an observation was three round trips to libvirtd (look up, read
// minicloud's metadata, read the state). On a host full of guests
// libvirtd's threads wait for a CPU like everyone else's, so each round
// trip is a wait of its own. Between two passes nothing changes a
// domain without libvirt telling us: every change of state or definition
// is a lifecycle event on this connection, and the driver's own calls
// (define, start, shutdown, destroy, reset, undefine) invalidate too. So a
// status read stays valid until an event or a call of ours about its
// domain, a lost connection, or statusMaxAge.
//
// Guards, each for a way an event can be missed:
//   - a status read while any invalidation happened (its ticket) is not
//     kept: the event may be about the state it read;
//   - nothing is kept for reattachGrace after connecting: a libvirtd that
//     just restarted is still reattaching to its QEMU processes and then
//     may change a domain's state without an event
//     (TestRecoversFromLibvirtdRestart notes libvirt 9.0 doing so);
//   - statusMaxAge bounds what any other miss can cost.
//
// Only existing domains are kept: a VM about to be created is observed
// absent once, and a domain of some other tool's is refused, not cached.

const (
	statusMaxAge  = 5 * time.Minute
	reattachGrace = 30 * time.Second
)

type statusCache struct {
	mu          sync.Mutex
	entries     map[string]cachedStatus
	gen         uint64        // bumped by every invalidation
	connectedAt time.Time     // zero while disconnected
	grace       time.Duration // reattachGrace (tests shorten it)
}

type cachedStatus struct {
	st hypervisor.DomainStatus
	at time.Time
}

// get returns the kept status of vmID, if it is still valid.
func (c *statusCache) get(vmID string) (hypervisor.DomainStatus, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[vmID]
	if !ok || time.Since(e.at) >= statusMaxAge {
		return hypervisor.DomainStatus{}, false
	}
	return e.st, true
}

// ticket is taken before reading a status from libvirtd; put keeps the
// status only if no invalidation happened since.
func (c *statusCache) ticket() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

func (c *statusCache) put(vmID string, ticket uint64, st hypervisor.DomainStatus) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ticket != c.gen || !st.Exists || c.connectedAt.IsZero() || time.Since(c.connectedAt) < c.grace {
		return
	}
	if c.entries == nil {
		c.entries = map[string]cachedStatus{}
	}
	c.entries[vmID] = cachedStatus{st: st, at: time.Now()}
}

// invalidate forgets vmID's status: an event about its domain, or a call
// of ours that changed it.
func (c *statusCache) invalidate(vmID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	delete(c.entries, vmID)
}

// reset forgets every status: the connection was made (connected) or lost
// (zero), and events may have been missed in between.
func (c *statusCache) reset(connectedAt time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.entries = nil
	c.connectedAt = connectedAt
}
