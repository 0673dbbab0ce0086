package server

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/api/imageservice"
	"github.com/minicloud/minicloud/api/ipam"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// The create cache: a create used to read, in one etcd round trip before
// its commit, the image, flavor and networks it refers to, its name and
// request-id keys and a probe of free addresses. That read was about a
// fifth of the CPU of a create and most of what the API server allocated
// for it (docs/benchmarks.md, "API"). Instead each API server keeps every
// image, flavor and network, and every allocated address (fed to the
// allocator's view, api/ipam), in memory, kept current by etcd watches,
// and a create's first try commits with no read at all.
//
// Unlike the credentials cache (credcache.go), this cache never decides
// anything by itself, so it needs no staleness bound: the create's
// transaction compares the mod revision of the image, flavor and networks
// it used, that the name, request id and addresses are absent and that the
// server group exists (store.CreateVMTxn). A copy behind etcd (a flavor
// changed or deleted at another replica a moment ago, a watch that
// stalled) is therefore a failed compare, and the create tries again with
// the etcd read (readCreateRefs), which also gives the precise answer
// (not found, name taken, the earlier VM of a retried request id). A VM
// is never created from an object that changed since.
//
// What the cache cannot check in the commit goes through the read: a
// create with a target host (the host is read, not compared), an object
// the cache does not hold, an image not visible to the project. While the
// cache is not synced (before its first list, after a watch broke, until
// it lists again) every create reads etcd, as before.

// createCacheRanges are the ranges the cache lists and watches.
var createCacheRanges = []struct {
	from     string
	keysOnly bool
}{
	{from: store.ImagePrefix},
	{from: store.FlavorPrefix},
	{from: store.NetworkPrefix},
	{from: store.IPAMPrefix, keysOnly: true},
}

// cachedRef is an image, flavor or network and its mod revision. The
// message is shared by every create that reads it: never modify it.
type cachedRef struct {
	msg proto.Message
	rev int64
}

type createCache struct {
	s *Server
	// watcher is where the watches come from (cacheWatcher).
	watcher clientv3.Watcher

	startOnce sync.Once

	mu     sync.RWMutex
	synced bool
	refs   map[string]cachedRef // by etcd key
	// hits counts the creates whose references the cache answered (tests
	// read it).
	hits atomic.Int64
}

func newCreateCache(s *Server) *createCache { return &createCache{s: s, watcher: cacheWatcher(s)} }

// start begins following etcd (once per server; the follower lists again
// by itself after a break).
func (c *createCache) start() {
	c.startOnce.Do(func() { go c.follow() })
}

// follow lists and watches until the server stops; a broken watch makes
// the cache unsynced until it has listed again.
func (c *createCache) follow() {
	c.s.followEtcd("create cache", "creates read etcd", c.followOnce, func() {
		c.mu.Lock()
		c.synced, c.refs = false, nil
		c.mu.Unlock()
		c.s.ipam.DropView()
	})
}

// followOnce lists the ranges in one snapshot, then applies the watches'
// changes after it until a watch breaks.
func (c *createCache) followOnce(ctx context.Context) error {
	var reads store.Reads
	lists := make([]store.Read, len(createCacheRanges))
	for i, r := range createCacheRanges {
		opts := []clientv3.OpOption{clientv3.WithPrefix()}
		if r.keysOnly {
			opts = append(opts, clientv3.WithKeysOnly())
		}
		lists[i] = reads.Get(r.from, opts...)
	}
	if err := reads.Do(ctx, c.s.etcd); err != nil {
		return err
	}
	rev := reads.Revision()
	refs := map[string]cachedRef{}
	var addrs [][]byte
	for i, l := range lists {
		for _, kv := range l.KVs() {
			if createCacheRanges[i].keysOnly {
				addrs = append(addrs, kv.Key)
				continue
			}
			putRef(refs, kv)
		}
	}

	// One context for every watch: the client sends them on one stream.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	watches := make([]clientv3.WatchChan, len(createCacheRanges))
	for i, r := range createCacheRanges {
		watches[i] = c.watcher.Watch(wctx, r.from, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	}
	c.mu.Lock()
	c.refs, c.synced = refs, true
	c.mu.Unlock()
	c.s.ipam.SetView(rev, addrs)

	for {
		var (
			resp clientv3.WatchResponse
			ok   bool
			i    int
		)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case resp, ok = <-watches[0]:
		case resp, ok = <-watches[1]:
			i = 1
		case resp, ok = <-watches[2]:
			i = 2
		case resp, ok = <-watches[3]:
			i = 3
		}
		if !ok {
			return errdefs.Unavailable("watch of %s ended", createCacheRanges[i].from)
		}
		if err := resp.Err(); err != nil {
			return err
		}
		if len(resp.Events) == 0 {
			continue
		}
		if createCacheRanges[i].keysOnly {
			evs := make([]ipam.ViewEvent, len(resp.Events))
			for j, ev := range resp.Events {
				evs[j] = ipam.ViewEvent{Key: ev.Kv.Key, Deleted: ev.Type == mvccpb.DELETE}
			}
			c.s.ipam.UpdateView(resp.Events[len(resp.Events)-1].Kv.ModRevision, evs)
			continue
		}
		c.mu.Lock()
		for _, ev := range resp.Events {
			if ev.Type == mvccpb.DELETE {
				delete(c.refs, string(ev.Kv.Key))
				continue
			}
			putRef(c.refs, ev.Kv)
		}
		c.mu.Unlock()
	}
}

// putRef decodes an image, flavor or network into refs. One that does not
// decode is left out: a create that needs it reads etcd, which reports it.
func putRef(refs map[string]cachedRef, kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	var m proto.Message
	switch {
	case strings.HasPrefix(key, store.ImagePrefix):
		m = &minicloudv1.Image{}
	case strings.HasPrefix(key, store.FlavorPrefix):
		m = &minicloudv1.Flavor{}
	case strings.HasPrefix(key, store.NetworkPrefix):
		m = &minicloudv1.Network{}
	default:
		return
	}
	if err := store.Decode(kv, m); err != nil {
		delete(refs, key)
		return
	}
	refs[key] = cachedRef{msg: m, rev: kv.ModRevision}
}

// createRefs answers what a create of spec in project refers to, as if
// readCreateRefs had read it with the name and request id found absent,
// or ok false when the cache cannot answer (not synced, a target host, an
// object it does not hold or that the project may not see): then read.
func (c *createCache) createRefs(project string, spec *minicloudv1.VMSpec) (*createRefs, bool) {
	c.start()
	if spec.GetTargetHost() != "" {
		return nil, false
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if !c.synced {
		return nil, false
	}
	imgRef, flvRef := c.refs[store.ImageKey(spec.GetImage())], c.refs[store.FlavorKey(spec.GetFlavor())]
	img, imgOK := imgRef.msg.(*minicloudv1.Image)
	flv, flvOK := flvRef.msg.(*minicloudv1.Flavor)
	if !imgOK || !flvOK || !imageservice.Visible(img, project) {
		return nil, false
	}
	refs := &createRefs{
		image: img, imageRev: imgRef.rev,
		flavor: flv, flavorRev: flvRef.rev,
		networks:    make([]*minicloudv1.Network, 0, len(spec.GetNetworks())),
		networkRevs: make([]int64, 0, len(spec.GetNetworks())),
		probes:      make([]*ipam.Probe, len(spec.GetNetworks())),
		present:     make([][]int64, len(spec.GetNetworks())),
	}
	for _, n := range spec.GetNetworks() {
		ref := c.refs[store.NetworkKey(project, n)]
		nw, ok := ref.msg.(*minicloudv1.Network)
		if !ok {
			return nil, false
		}
		refs.networks, refs.networkRevs = append(refs.networks, nw), append(refs.networkRevs, ref.rev)
	}
	c.hits.Add(1)
	return refs, true
}
