package libvirt

// StatusReads is how many Status calls of d asked libvirtd rather than
// its cache.
func StatusReads(d *Driver) int64 { return d.statusReads.Load() }

// WithoutReattachGrace lets d keep statuses right after connecting (a test
// that restarts no libvirtd need not wait reattachGrace).
func WithoutReattachGrace(d *Driver) {
	d.c.statuses.mu.Lock()
	defer d.c.statuses.mu.Unlock()
	d.c.statuses.grace = 0
}
