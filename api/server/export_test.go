package server

import "time"

// SetVMHistory sets how many changes the VM watch cache of servers
// started from now on keeps, and returns a function that restores it.
func SetVMHistory(n int) (restore func()) {
	old := vmHistory
	vmHistory = n
	return func() { vmHistory = old }
}

// SetCredTiming sets the credentials cache's heartbeat and staleness bound
// for servers started from now on, and returns a function that restores
// them.
func SetCredTiming(heartbeat, staleAfter time.Duration) (restore func()) {
	oldH, oldS := credHeartbeat, credStaleAfter
	credHeartbeat, credStaleAfter = heartbeat, staleAfter
	return func() { credHeartbeat, credStaleAfter = oldH, oldS }
}

// CredCacheHits is how many calls s's credentials cache answered.
func (s *Server) CredCacheHits() int64 { return s.creds.hits.Load() }

// CredCacheCurrent says whether s's credentials cache would answer now.
func (s *Server) CredCacheCurrent() bool {
	s.creds.mu.RLock()
	defer s.creds.mu.RUnlock()
	return s.creds.current()
}

// StallCredWatch makes s's credentials cache stop taking watch answers,
// as a watch that went silent; resume undoes it.
func (s *Server) StallCredWatch() (resume func()) {
	s.creds.gate.Lock()
	return s.creds.gate.Unlock
}
