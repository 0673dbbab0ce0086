package metadata

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
)

// Directory is the in-memory source of truth for lookups: the instances
// running on this host, indexed by where their packets come from. The agent
// feeds it from its assignment watch (Set after the initial list, Upsert and
// Remove on changes); the server only reads it, so a request never waits on
// etcd. It is safe for concurrent use.
type Directory struct {
	mu     sync.RWMutex
	byID   map[string]*entry
	byAddr map[addrKey]*entry // nil value: two instances claim the address
	// claims counts the instances that claim each address, so Upsert and
	// Remove update the index for the instance's own addresses only.
	claims map[addrKey]int
}

type addrKey struct {
	iface string
	ip    netip.Addr
}

// entry is one version of one instance. It is replaced, never mutated, when
// the instance changes; closing changed wakes long-polls on the old version.
type entry struct {
	inst    *Instance
	etag    string
	changed chan struct{}

	renderOnce sync.Once
	rendered   *rendered
	renderErr  error

	// guest is the instance's limiter state, found in the server's map on
	// the first request to this version and kept here so later requests
	// skip the map and its lock. The map stays the state's home: a new
	// version (a new entry) finds the same state there.
	guest atomic.Pointer[guestState]
}

// rendered holds an instance's trees, built on first use, with their
// paths indexed.
type rendered struct {
	ec2       *node
	openstack *node
	gce       *gnode

	ec2Paths, openstackPaths pathIndex[*node]
	gcePaths                 pathIndex[*gnode]
}

// NewDirectory returns an empty Directory.
func NewDirectory() *Directory {
	return &Directory{byID: map[string]*entry{}, byAddr: map[addrKey]*entry{}, claims: map[addrKey]int{}}
}

// Set replaces the whole content with insts (the agent's full assignment
// list). Instances whose fingerprint did not change keep their entry, so
// long-polls on them are not woken.
func (d *Directory) Set(insts []*Instance) error {
	for _, inst := range insts {
		if err := inst.Validate(); err != nil {
			return fmt.Errorf("metadata directory: %w", err)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	next := make(map[string]*entry, len(insts))
	for _, inst := range insts {
		next[inst.ID] = d.entryFor(inst)
	}
	for id, old := range d.byID {
		if next[id] != old {
			close(old.changed)
		}
	}
	d.byID = next
	d.reindex()
	return nil
}

// Upsert adds or replaces one instance.
func (d *Directory) Upsert(inst *Instance) error {
	if err := inst.Validate(); err != nil {
		return fmt.Errorf("metadata directory: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entryFor(inst)
	if old, ok := d.byID[inst.ID]; ok {
		if old == e {
			return nil
		}
		close(old.changed)
		d.unindex(old)
	}
	d.byID[inst.ID] = e
	d.index(e)
	return nil
}

// Remove forgets an instance; unknown ids are ignored.
func (d *Directory) Remove(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	old, ok := d.byID[id]
	if !ok {
		return
	}
	close(old.changed)
	delete(d.byID, id)
	d.unindex(old)
}

// entryFor returns the current entry when inst says the same thing, and a
// new one otherwise. d.mu must be held.
func (d *Directory) entryFor(inst *Instance) *entry {
	etag := inst.Fingerprint()
	if old, ok := d.byID[inst.ID]; ok && old.etag == etag {
		return old
	}
	return &entry{inst: inst, etag: etag, changed: make(chan struct{})}
}

// reindex rebuilds the address index. An address claimed by two instances
// (which IPAM never allows) maps to nobody: refusing both is safer than
// answering one with the other's data. d.mu must be held.
func (d *Directory) reindex() {
	d.byAddr = make(map[addrKey]*entry, len(d.byID))
	d.claims = make(map[addrKey]int, len(d.byID))
	for _, e := range d.byID {
		d.index(e)
	}
}

// index adds e's addresses to the index; unindex takes them out. Only
// those addresses are touched, so one change costs the same however many
// instances the host has. d.mu must be held.
func (d *Directory) index(e *entry) {
	for _, k := range e.addrs() {
		d.claims[k]++
		if d.claims[k] == 1 {
			d.byAddr[k] = e
		} else {
			d.byAddr[k] = nil
		}
	}
}

func (d *Directory) unindex(e *entry) {
	for _, k := range e.addrs() {
		d.claims[k]--
		switch d.claims[k] {
		case 0:
			delete(d.claims, k)
			delete(d.byAddr, k)
		case 1:
			// The one claimant left: found by its address, as reindex
			// would (a rare case: two instances claimed the address).
			d.byAddr[k] = d.claimant(k)
		}
	}
}

// claimant is the one instance that claims k. d.mu must be held.
func (d *Directory) claimant(k addrKey) *entry {
	for _, e := range d.byID {
		for _, a := range e.addrs() {
			if a == k {
				return e
			}
		}
	}
	return nil
}

// addrs are the (bridge, address) keys of e's interfaces, each once.
func (e *entry) addrs() []addrKey {
	out := make([]addrKey, 0, len(e.inst.Interfaces))
	for _, nic := range e.inst.Interfaces {
		k := addrKey{nic.Bridge, nic.Address.Addr()}
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

// Lookup returns the instance whose interface on bridge iface has address
// src.
func (d *Directory) Lookup(iface string, src netip.Addr) (*Instance, bool) {
	e := d.lookup(iface, src)
	if e == nil {
		return nil, false
	}
	return e.inst, true
}

func (d *Directory) lookup(iface string, src netip.Addr) *entry {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.byAddr[addrKey{iface, src.Unmap()}]
}

// Get returns the instance with the given id.
func (d *Directory) Get(id string) (*Instance, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	e, ok := d.byID[id]
	if !ok {
		return nil, false
	}
	return e.inst, true
}

// current returns the entry now held for id, if any.
func (d *Directory) current(id string) *entry {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.byID[id]
}

// Len is the number of instances.
func (d *Directory) Len() int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return len(d.byID)
}
