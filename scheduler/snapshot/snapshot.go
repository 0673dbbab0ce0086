// Package snapshot keeps the scheduler's view of the cluster — hosts,
// liveness, allocations, claims per server group, server-group policies —
// current from etcd watches, so that a decision reads memory instead of
// etcd. The view may lag etcd; that is safe because every claim is committed
// with a compare on the host allocation's mod revision (see pkg/store
// claims.go): a decision made on a stale view fails to commit and is retried
// after the host is refreshed (RefreshHost).
//
// Claims this replica commits are applied to the view at once (Confirm),
// before the watch echoes them, and events older than what the view already
// holds are ignored, so the view only moves forward.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
	"github.com/minicloud/minicloud/scheduler/placement"
)

// ErrGroupBusy is returned by Reserve when a claim for another member of the
// request's server group is being committed by this replica: the group's
// members must be decided one after the other, or two first members of an
// affinity group could land on different hosts.
var ErrGroupBusy = errors.New("another member of the server group is being placed")

// Snapshot is the watched view. Its methods are safe for concurrent use.
type Snapshot struct {
	cli *clientv3.Client
	log *slog.Logger

	mu         sync.Mutex
	cluster    *placement.Cluster
	index      map[string]int // host name -> position in cluster.Hosts
	alive      map[string]bool
	fenced     map[string]bool          // hosts/fenced/<name> exists
	fenceAfter map[string]time.Duration // host -> its agent's self-fencing delay
	alloc      map[string]allocState
	claims     map[string]map[string]claimState // host -> vm id -> claim
	policies   map[string]minicloudv1.ServerGroupPolicy
	busyGroups map[string]bool
	// pending is, per host, what this replica has reserved and not yet
	// committed or aborted (placement.Host.Pending). Like busyGroups it
	// outlives a reload: the reservations are still out.
	pending map[string]pendingUse
	prefer  func(host string) bool
	synced  chan struct{}
	onAlive func(host string)
	// applied is, per watched prefix, the etcd revision up to which its
	// changes are in the view; advanced is closed (and replaced) whenever
	// one of them moves. WaitApplied uses both.
	applied  []int64
	advanced chan struct{}
}

type allocState struct {
	value  *minicloudv1.HostAllocation // nil: absent
	modRev int64                       // 0: absent
	seen   int64                       // newest revision applied
}

type pendingUse struct {
	res placement.Resources
	vms int
}

type claimState struct {
	group  string
	modRev int64
}

// New returns an empty snapshot; Run fills it and keeps it current.
// onAliveChange, if not nil, is called (without locks held) with the name of
// every host whose liveness changed, including after a resync.
func New(cli *clientv3.Client, log *slog.Logger, onAliveChange func(host string)) *Snapshot {
	s := &Snapshot{cli: cli, log: log, onAlive: onAliveChange, synced: make(chan struct{}),
		applied: make([]int64, len(watchedPrefixes)), advanced: make(chan struct{})}
	s.reset()
	return s
}

func (s *Snapshot) reset() {
	in := s.cluster
	s.cluster = placement.NewCluster()
	if in != nil {
		s.cluster.Partitioned = in.Partitioned
	}
	s.index = map[string]int{}
	s.alive = map[string]bool{}
	s.fenced = map[string]bool{}
	s.fenceAfter = map[string]time.Duration{}
	s.alloc = map[string]allocState{}
	s.claims = map[string]map[string]claimState{}
	s.policies = map[string]minicloudv1.ServerGroupPolicy{}
	if s.busyGroups == nil {
		s.busyGroups = map[string]bool{}
		s.pending = map[string]pendingUse{}
	}
}

// Synced is closed once the first full read has been applied.
func (s *Snapshot) Synced() <-chan struct{} { return s.synced }

// Run loads the view and follows the watches until ctx ends. When a watch
// fails (e.g. its revision was compacted) it reloads everything.
func (s *Snapshot) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := s.load(ctx)
		if err == nil {
			backoff = 100 * time.Millisecond
			err = s.follow(ctx, rev)
		}
		if ctx.Err() != nil {
			break
		}
		s.log.Warn("scheduler snapshot: resyncing", "err", err, "after", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	return ctx.Err()
}

var watchedPrefixes = []string{store.HostPrefix, store.ClaimPrefix, store.ServerGroupPrefix}

// load reads every watched prefix at one revision and replaces the view.
func (s *Snapshot) load(ctx context.Context) (int64, error) {
	var reads store.Reads
	prefixes := make([]store.Read, len(watchedPrefixes))
	for i, p := range watchedPrefixes {
		prefixes[i] = reads.Get(p, clientv3.WithPrefix())
	}
	if err := reads.Do(ctx, s.cli); err != nil {
		return 0, fmt.Errorf("load scheduler snapshot: %w", err)
	}
	s.mu.Lock()
	before := s.alive
	s.reset()
	for _, r := range prefixes {
		for _, kv := range r.KVs() {
			s.apply(mvccpb.PUT, kv)
		}
	}
	var changed []string
	for h, up := range s.alive {
		if before[h] != up {
			changed = append(changed, h)
		}
	}
	for h, up := range before {
		if up && !s.alive[h] {
			changed = append(changed, h)
		}
	}
	for i := range s.applied {
		s.setApplied(i, reads.Revision())
	}
	s.mu.Unlock()
	select {
	case <-s.synced:
	default:
		close(s.synced)
	}
	s.notify(changed)
	return reads.Revision(), nil
}

// follow applies watch events after rev until a watch fails or ctx ends.
func (s *Snapshot) follow(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	chans := make([]clientv3.WatchChan, len(watchedPrefixes))
	for i, p := range watchedPrefixes {
		chans[i] = s.cli.Watch(wctx, p, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	}
	for {
		var resp clientv3.WatchResponse
		var ok bool
		var from int
		select {
		case <-ctx.Done():
			return ctx.Err()
		case resp, ok = <-chans[0]:
		case resp, ok = <-chans[1]:
			from = 1
		case resp, ok = <-chans[2]:
			from = 2
		}
		if !ok {
			return errors.New("watch closed")
		}
		if err := resp.Err(); err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		s.mu.Lock()
		var changed []string
		for _, ev := range resp.Events {
			if h, ok := s.apply(ev.Type, ev.Kv); ok {
				changed = append(changed, h)
			}
		}
		// Events and progress notifications alike: every change of this
		// prefix up to the header's revision has now been delivered.
		s.setApplied(from, resp.Header.Revision)
		s.mu.Unlock()
		s.notify(changed)
	}
}

// setApplied records that prefix i is applied up to rev (mu held).
func (s *Snapshot) setApplied(i int, rev int64) {
	if rev <= s.applied[i] {
		return
	}
	s.applied[i] = rev
	close(s.advanced)
	s.advanced = make(chan struct{})
}

// WaitApplied returns once the view holds every change of the watched
// prefixes that etcd had made by revision rev, or with ctx's error. For each
// prefix it reads the newest modification revision there (a keys-only,
// limit-1 read) and waits for its watch to deliver that far. Watch progress
// requests would also do, but etcd defers one that arrives while any of its
// watchers catches up and sends it only with the stream's next event, which
// a quiet cluster may never produce. A deletion is seen through the write
// that comes with it: a released claim always rewrites hosts/alloc/<host>.
func (s *Snapshot) WaitApplied(ctx context.Context, rev int64) error {
	targets := make([]int64, len(watchedPrefixes))
	for i, p := range watchedPrefixes {
		resp, err := s.cli.Get(ctx, p, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(1),
			clientv3.WithSort(clientv3.SortByModRevision, clientv3.SortDescend), clientv3.WithMaxModRev(rev))
		if err != nil {
			return fmt.Errorf("scheduler snapshot: newest change under %s: %w", p, err)
		}
		if len(resp.Kvs) > 0 {
			targets[i] = resp.Kvs[0].ModRevision
		}
	}
	for {
		s.mu.Lock()
		caughtUp := true
		for i, t := range targets {
			caughtUp = caughtUp && s.applied[i] >= t
		}
		advanced := s.advanced
		s.mu.Unlock()
		if caughtUp {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-advanced:
		}
	}
}

func (s *Snapshot) notify(hosts []string) {
	if s.onAlive == nil {
		return
	}
	for _, h := range hosts {
		s.onAlive(h)
	}
}

// apply folds one key change into the view (mu held). It returns the host
// name and true when the change flipped a host's liveness.
func (s *Snapshot) apply(typ mvccpb.Event_EventType, kv *mvccpb.KeyValue) (string, bool) {
	key := string(kv.Key)
	del := typ == mvccpb.DELETE
	switch {
	case strings.HasPrefix(key, store.HostSpecPrefix):
		name := key[len(store.HostSpecPrefix):]
		if del {
			s.removeHost(name)
			return "", false
		}
		h := &minicloudv1.Host{}
		if err := store.Decode(kv, h); err != nil {
			s.log.Error("scheduler snapshot: undecodable host", "key", key, "err", err)
			return "", false
		}
		s.putHost(name, h)
	case strings.HasPrefix(key, store.HostAlivePrefix):
		name := key[len(store.HostAlivePrefix):]
		was := s.alive[name]
		if del {
			delete(s.alive, name)
		} else {
			s.alive[name] = true
		}
		if host := s.host(name); host != nil {
			host.Up = !del
		}
		return name, was == del
	case strings.HasPrefix(key, store.HostFencedPrefix):
		// Decisions ignore it (a fenced host is down); metrics show it.
		if name := key[len(store.HostFencedPrefix):]; del {
			delete(s.fenced, name)
		} else {
			s.fenced[name] = true
		}
	case strings.HasPrefix(key, store.HostAllocPrefix):
		name := key[len(store.HostAllocPrefix):]
		if kv.ModRevision <= s.alloc[name].seen {
			return "", false // the view already holds this or a newer value
		}
		if del {
			s.setAlloc(name, allocState{seen: kv.ModRevision})
			return "", false
		}
		a := &minicloudv1.HostAllocation{}
		if err := store.Decode(kv, a); err != nil {
			s.log.Error("scheduler snapshot: undecodable allocation", "key", key, "err", err)
			return "", false
		}
		s.setAlloc(name, allocState{value: a, modRev: kv.ModRevision, seen: kv.ModRevision})
	case strings.HasPrefix(key, store.ClaimPrefix):
		host, vmID, ok := store.ParseClaimKey(key)
		if !ok {
			return "", false
		}
		if del {
			if c, ok := s.claims[host][vmID]; ok && c.modRev < kv.ModRevision {
				s.removeClaim(host, vmID)
			}
			return "", false
		}
		c := &minicloudv1.Claim{}
		if err := store.Decode(kv, c); err != nil {
			s.log.Error("scheduler snapshot: undecodable claim", "key", key, "err", err)
			return "", false
		}
		s.addClaim(host, vmID, groupOf(c), kv.ModRevision)
	case strings.HasPrefix(key, store.ServerGroupPrefix):
		g := key[len(store.ServerGroupPrefix):] // <project>/<name> = placement.GroupKey
		if del {
			delete(s.policies, g)
			return "", false
		}
		sg := &minicloudv1.ServerGroup{}
		if err := store.Decode(kv, sg); err != nil {
			s.log.Error("scheduler snapshot: undecodable server group", "key", key, "err", err)
			return "", false
		}
		s.policies[g] = sg.GetPolicy()
	}
	return "", false
}

func groupOf(c *minicloudv1.Claim) string {
	if c.GetServerGroup() == "" {
		return ""
	}
	return placement.GroupKey(c.GetProject(), c.GetServerGroup())
}

func (s *Snapshot) host(name string) *placement.Host {
	if i, ok := s.index[name]; ok {
		return s.cluster.Hosts[i]
	}
	return nil
}

func (s *Snapshot) putHost(name string, spec *minicloudv1.Host) {
	h := s.host(name)
	if h == nil {
		h = &placement.Host{Name: name}
		s.index[name] = len(s.cluster.Hosts)
		s.cluster.Hosts = append(s.cluster.Hosts, h)
		s.cluster.ByName[name] = h
		h.Up = s.alive[name]
		h.Preferred = s.prefer == nil || s.prefer(name)
		s.syncHost(name)
	}
	s.fenceAfter[name] = time.Duration(spec.GetFenceAfterSeconds()) * time.Second
	h.Zone = spec.GetAvailabilityZone()
	h.Hypervisors = spec.GetHypervisors()
	h.Disabled = spec.GetDisabled()
	h.Capacity = placement.ResourcesFromProto(spec.GetCapacity())
	h.Ratios = placement.RatiosFromProto(spec.GetAllocationRatios())
}

func (s *Snapshot) removeHost(name string) {
	i, ok := s.index[name]
	if !ok {
		return
	}
	last := len(s.cluster.Hosts) - 1
	s.cluster.Hosts[i] = s.cluster.Hosts[last]
	s.index[s.cluster.Hosts[i].Name] = i
	s.cluster.Hosts = s.cluster.Hosts[:last]
	delete(s.index, name)
	delete(s.cluster.ByName, name)
	delete(s.fenceAfter, name)
}

func (s *Snapshot) setAlloc(name string, st allocState) {
	s.alloc[name] = st
	s.syncHost(name)
}

// syncHost sets the host's allocation in the cluster from its committed
// allocation and this replica's pending reservations.
func (s *Snapshot) syncHost(name string) {
	h := s.host(name)
	if h == nil {
		return
	}
	a, p := s.alloc[name].value, s.pending[name]
	h.Pending = p.res
	h.Allocated = placement.ResourcesFromProto(a.GetAllocated()).Add(p.res)
	h.VMCount = int(a.GetVmCount()) + p.vms
}

func (s *Snapshot) addClaim(host, vmID, group string, modRev int64) {
	m := s.claims[host]
	if m == nil {
		m = map[string]claimState{}
		s.claims[host] = m
	}
	if old, ok := m[vmID]; ok {
		if old.modRev < modRev {
			m[vmID] = claimState{group: old.group, modRev: modRev}
		}
		return
	}
	m[vmID] = claimState{group: group, modRev: modRev}
	if group != "" {
		g := s.cluster.Groups[group]
		if g == nil {
			g = map[string]int{}
			s.cluster.Groups[group] = g
		}
		g[host]++
	}
}

func (s *Snapshot) removeClaim(host, vmID string) {
	c, ok := s.claims[host][vmID]
	if !ok {
		return
	}
	delete(s.claims[host], vmID)
	if c.group == "" {
		return
	}
	g := s.cluster.Groups[c.group]
	if g[host]--; g[host] <= 0 {
		delete(g, host)
	}
	if len(g) == 0 {
		delete(s.cluster.Groups, c.group)
	}
}

// SetPreferred marks this replica's share of the hosts
// (placement.Cluster.Partitioned); call it again whenever the share
// changes. prefer must not call back into the snapshot.
func (s *Snapshot) SetPreferred(prefer func(host string) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.prefer = prefer
	s.cluster.Partitioned = prefer != nil
	for _, h := range s.cluster.Hosts {
		h.Preferred = prefer == nil || prefer(h.Name)
	}
}

// Policy returns the policy of server group key (placement.GroupKey).
func (s *Snapshot) Policy(group string) (minicloudv1.ServerGroupPolicy, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.policies[group]
	return p, ok
}

// Alive reports whether host's heartbeat lease exists in the view.
func (s *Snapshot) Alive(host string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.alive[host]
}

// DownHost is a registered host without its heartbeat lease.
type DownHost struct {
	Name string
	// FenceAfter is its agent's self-fencing delay (0: it never
	// self-fences).
	FenceAfter time.Duration
}

// Down lists the registered hosts whose lease is gone in the view.
func (s *Snapshot) Down() []DownHost {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []DownHost
	for _, h := range s.cluster.Hosts {
		if !s.alive[h.Name] {
			out = append(out, DownHost{Name: h.Name, FenceAfter: s.fenceAfter[h.Name]})
		}
	}
	return out
}

// HostView is a host as the view holds it, with its failure state.
type HostView struct {
	placement.Host
	// Fenced: hosts/fenced/<name> exists (the host runs none of its VMs).
	Fenced bool
}

// Hosts returns a copy of every host in the view.
func (s *Snapshot) Hosts() []HostView {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]HostView, len(s.cluster.Hosts))
	for i, h := range s.cluster.Hosts {
		out[i] = HostView{Host: *h, Fenced: s.fenced[h.Name]}
		out[i].Hypervisors = slices.Clone(h.Hypervisors)
	}
	return out
}

// Host returns a copy of the named host as the view holds it.
func (s *Snapshot) Host(name string) (placement.Host, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.host(name)
	if h == nil {
		return placement.Host{}, false
	}
	return *h, true
}

// Reservation is a decision this replica is committing. Its resources
// stay counted on its host (placement.Host.Pending), and its server group
// stays busy, until Confirm or Abort.
type Reservation struct {
	Decision  placement.Decision
	Host      string
	Group     string
	Resources placement.Resources
	// DecideTime is the duration of the placement.Schedule call.
	DecideTime time.Duration
}

// Reserve runs placement.Schedule on the view and reserves the request's
// resources on the chosen host, so that the next decision stacks on them
// (several reservations on one host go out in one group commit). It returns
// the *placement.NoValidHostError from Schedule, or ErrGroupBusy.
// DecideTime is set in every case where Schedule ran.
func (s *Snapshot) Reserve(req *placement.Request, p *placement.Policy, rng *rand.Rand) (Reservation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Group != "" && s.busyGroups[req.Group] {
		return Reservation{}, ErrGroupBusy
	}
	start := time.Now()
	d, err := placement.Schedule(s.cluster, req, p, rng)
	r := Reservation{DecideTime: time.Since(start)}
	if err != nil {
		return r, err
	}
	r.Decision, r.Host, r.Group, r.Resources = d, d.Host.Name, req.Group, req.Resources
	r.Decision.Host = nil // the pointer is the view's, guarded by mu
	u := s.pending[r.Host]
	s.pending[r.Host] = pendingUse{res: u.res.Add(r.Resources), vms: u.vms + 1}
	s.syncHost(r.Host)
	if r.Group != "" {
		s.busyGroups[r.Group] = true
	}
	return r, nil
}

// Confirm applies a committed claim to the view at once (the watch echo
// that follows is then ignored) and ends the reservation. rev is the
// revision of the commit.
func (s *Snapshot) Confirm(r Reservation, alloc *minicloudv1.HostAllocation, claim *minicloudv1.Claim, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rev > s.alloc[r.Host].seen {
		s.setAlloc(r.Host, allocState{value: alloc, modRev: rev, seen: rev})
	}
	s.addClaim(r.Host, claim.GetVmId(), groupOf(claim), rev)
	s.release(r)
}

// CommitBase is what a host's next group commit builds on: the committed
// allocation as the view holds it (nil: none yet) and its mod revision,
// for the commit's compare, and the host's limits, to take only the
// reservations that fit on it (the view may have moved since they were
// decided). ok is false if the host is gone from the view.
func (s *Snapshot) CommitBase(host string) (alloc *minicloudv1.HostAllocation, modRev int64, limits placement.Resources, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.host(host)
	if h == nil {
		return nil, 0, placement.Resources{}, false
	}
	st := s.alloc[host]
	if st.value != nil {
		alloc = proto.CloneOf(st.value)
	}
	return alloc, st.modRev, h.Limits(), true
}

// Abort ends a reservation whose commit did not happen.
func (s *Snapshot) Abort(r Reservation) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.release(r)
}

func (s *Snapshot) release(r Reservation) {
	p := s.pending[r.Host]
	if p.vms <= 1 {
		delete(s.pending, r.Host)
	} else {
		s.pending[r.Host] = pendingUse{res: p.res.Sub(r.Resources), vms: p.vms - 1}
	}
	s.syncHost(r.Host)
	if r.Group != "" {
		delete(s.busyGroups, r.Group)
	}
}

// RefreshHost replaces the view of host's allocation and claims with what
// was read from etcd at revision rev (after a commit lost a race): alloc is
// the hosts/alloc key (nil if absent) and claims the keys under
// claims/<host>/.
func (s *Snapshot) RefreshHost(host string, alloc *mvccpb.KeyValue, claims []*mvccpb.KeyValue, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if alloc != nil {
		s.apply(mvccpb.PUT, alloc)
	} else if rev > s.alloc[host].seen {
		s.setAlloc(host, allocState{seen: rev})
	}
	present := make(map[string]bool, len(claims))
	for _, kv := range claims {
		s.apply(mvccpb.PUT, kv)
		present[store.LastSegment(string(kv.Key))] = true
	}
	for vmID, c := range s.claims[host] {
		if !present[vmID] && c.modRev <= rev {
			s.removeClaim(host, vmID)
		}
	}
}
