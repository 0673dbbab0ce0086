package metadata

import (
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// guestState is what the server keeps per VM: its rate limiter and when it
// was last answered.
type guestState struct {
	lim      *rate.Limiter
	lastSeen atomic.Int64 // unix nanoseconds
	waits    atomic.Int64 // hanging wait_for_change requests
}

// startWait admits one more hanging request of VM id, within the VM's and
// the service's bounds; done gives the place back.
func (s *Server) startWait(id string) (done func(), ok bool) {
	s.limMu.Lock()
	g := s.limiters[id]
	s.limMu.Unlock()
	if g == nil {
		return nil, false
	}
	if g.waits.Add(1) > int64(s.opts.MaxWaitsPerGuest) {
		g.waits.Add(-1)
		return nil, false
	}
	if s.waits.Add(1) > int64(s.opts.MaxWaits) {
		s.waits.Add(-1)
		g.waits.Add(-1)
		return nil, false
	}
	return func() { g.waits.Add(-1); s.waits.Add(-1) }, true
}

// allow applies the per-VM rate limit at now and returns the VM's state.
func (s *Server) allow(e *entry, now time.Time) (*guestState, bool) {
	if g := e.guest.Load(); g != nil {
		return g, g.lim.AllowN(now, 1)
	}
	id := e.inst.ID
	s.limMu.Lock()
	g, ok := s.limiters[id]
	if !ok {
		if len(s.limiters) > 2*s.dir.Len()+64 {
			for k := range s.limiters {
				if _, live := s.dir.Get(k); !live {
					delete(s.limiters, k)
				}
			}
		}
		g = &guestState{lim: rate.NewLimiter(s.opts.RateLimit, s.opts.RateBurst)}
		s.limiters[id] = g
	}
	s.limMu.Unlock()
	e.guest.Store(g)
	return g, g.lim.AllowN(now, 1)
}

// markSeen records that VM id, whose state allow returned, was answered at
// now.
func (s *Server) markSeen(g *guestState, id string, now time.Time) {
	if g.lastSeen.Swap(now.UnixNano()) == 0 && s.opts.OnFirstRequest != nil {
		s.opts.OnFirstRequest(id)
	}
}

// LastSeen reports when the VM last had a request identified and let
// through the rate limit — the agent's evidence that the guest is up and
// reading its metadata.
func (s *Server) LastSeen(vmID string) (time.Time, bool) {
	s.limMu.Lock()
	g, ok := s.limiters[vmID]
	s.limMu.Unlock()
	if !ok {
		return time.Time{}, false
	}
	ns := g.lastSeen.Load()
	if ns == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, ns), true
}
