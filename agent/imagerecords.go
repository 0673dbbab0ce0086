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
// pass after the agent started) always asks the API; concurrent asks for
// one name share one call, so ten creates of one image cost one GetImage.
// Pins are bounded by the VMs on the host; records by the images they use.
type imageRecords struct {
	get    func(ctx context.Context, name string) (*minicloudv1.Image, error)
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

// forget drops the pin of a VM leaving the host.
func (r *imageRecords) forget(vmID string) {
	r.mu.Lock()
	delete(r.pins, vmID)
	r.mu.Unlock()
}
