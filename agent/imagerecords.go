package agent

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// imageCallTimeout bounds one shared GetImage call: it runs detached from
// the context of the caller that started it, so that caller giving up does
// not fail the others waiting for the same answer.
const imageCallTimeout = 30 * time.Second

// imageRecords keeps the image records (ImageService.GetImage) the agent's
// VMs are built from, so that a reconcile pass of a VM whose disk exists
// asks the API nothing: every pass used to call GetImage, one round trip
// (TLS, a token read in etcd) per VM per pass.
//
// A VM is pinned to the record, name and digests, it was first resolved
// with, and keeps it until teardown. No watch is needed to invalidate it:
// records are immutable, and the API refuses to delete an image while a
// VM uses it (imageservice.Config.InUse), so the name cannot point at other
// bytes while the pin exists. A VM not pinned yet (a create, or the first
// pass after the agent started) asks the API unless it can share a pin
// (below); concurrent asks for one name share one call, so ten creates of
// one image cost one GetImage.
// Pins are bounded by the VMs on the host; records by the images they use.
//
// A new VM whose image another VM of the host is pinned to takes that pin
// instead of asking (a round trip the define waits for, 2-4 ms of a
// create on a loaded host in hack/agentbench), if that VM is still
// assigned here on the same assignment stream (alive). That is the record
// the API would answer: the new VM uses the name from its create on, the
// other VM from before its pin to now (the stream would have delivered its
// removal before the new VM), so at every moment since the earlier of the
// two one of them used it: the name could not be deleted and made again,
// and records are immutable. Only a pin of a VM alive now is taken: one
// removed behind the host's back (while it was fenced) leaves its pin
// until its teardown, and the name may have been made again since.
type imageRecords struct {
	get func(ctx context.Context, name string) (*minicloudv1.Image, error)
	// alive says VM other is still assigned on the stream that delivered
	// vmID (nil: no pin is shared).
	alive  func(vmID, other string) bool
	flight singleflight.Group // by image name

	mu   sync.Mutex
	pins map[string]*minicloudv1.Image // by VM id
}

func newImageRecords(get func(ctx context.Context, name string) (*minicloudv1.Image, error)) *imageRecords {
	return &imageRecords{get: get, pins: map[string]*minicloudv1.Image{}}
}

// lookup returns the record of image name for VM vmID: its pin when it has
// one for that name, else the API's answer, which it pins.
func (r *imageRecords) lookup(ctx context.Context, vmID, name string) (*minicloudv1.Image, error) {
	r.mu.Lock()
	img := r.pins[vmID]
	r.mu.Unlock()
	if img != nil && img.GetMeta().GetName() == name {
		return img, nil
	}
	if img := r.shared(vmID, name); img != nil {
		return img, nil
	}
	ch := r.flight.DoChan(name, func() (any, error) {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), imageCallTimeout)
		defer cancel()
		return r.get(cctx, name)
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		img = res.Val.(*minicloudv1.Image)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	r.mu.Lock()
	r.pins[vmID] = img
	r.mu.Unlock()
	return img, nil
}

// shared pins vmID to the record another alive VM is pinned to for name,
// and returns it (nil if there is none).
func (r *imageRecords) shared(vmID, name string) *minicloudv1.Image {
	if r.alive == nil {
		return nil
	}
	type pin struct {
		vm  string
		img *minicloudv1.Image
	}
	var pins []pin
	r.mu.Lock()
	for id, img := range r.pins {
		if id != vmID && img.GetMeta().GetName() == name {
			pins = append(pins, pin{id, img})
		}
	}
	r.mu.Unlock()
	// alive takes the agent's lock: not under r.mu. A pin dropped
	// meanwhile still names the right record if its VM is alive now.
	for _, p := range pins {
		if r.alive(vmID, p.vm) {
			r.mu.Lock()
			r.pins[vmID] = p.img
			r.mu.Unlock()
			return p.img
		}
	}
	return nil
}

// forget drops the pin of a VM leaving the host.
func (r *imageRecords) forget(vmID string) {
	r.mu.Lock()
	delete(r.pins, vmID)
	r.mu.Unlock()
}
