package agent

import (
	"context"
	"sync"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

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
	get func(ctx context.Context, name string) (*minicloudv1.Image, error)

	mu       sync.Mutex
	pins     map[string]*minicloudv1.Image // by VM id
	inflight map[string]*imageCall         // by image name
}

type imageCall struct {
	done chan struct{}
	img  *minicloudv1.Image
	err  error
	// abandoned: the caller that made the call saw its context end.
	abandoned bool
}

func newImageRecords(get func(ctx context.Context, name string) (*minicloudv1.Image, error)) *imageRecords {
	return &imageRecords{get: get, pins: map[string]*minicloudv1.Image{}, inflight: map[string]*imageCall{}}
}

// lookup returns the record of image name for VM vmID: its pin when it has
// one for that name, else the API's answer, which it pins.
func (r *imageRecords) lookup(ctx context.Context, vmID, name string) (*minicloudv1.Image, error) {
	r.mu.Lock()
	if img := r.pins[vmID]; img != nil && img.GetMeta().GetName() == name {
		r.mu.Unlock()
		return img, nil
	}
	call, joined := r.inflight[name]
	if !joined {
		call = &imageCall{done: make(chan struct{})}
		r.inflight[name] = call
	}
	r.mu.Unlock()

	if !joined {
		// The call runs under the first caller's context; one whose
		// context ends does not cancel the others (they retry below).
		call.img, call.err = r.get(ctx, name)
		call.abandoned = ctx.Err() != nil
		r.mu.Lock()
		delete(r.inflight, name)
		r.mu.Unlock()
		close(call.done)
	} else {
		select {
		case <-call.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if call.err != nil && call.abandoned {
			return r.lookup(ctx, vmID, name)
		}
	}
	if call.err != nil {
		return nil, call.err
	}
	r.mu.Lock()
	r.pins[vmID] = call.img
	r.mu.Unlock()
	return call.img, nil
}

// forget drops the pin of a VM leaving the host.
func (r *imageRecords) forget(vmID string) {
	r.mu.Lock()
	delete(r.pins, vmID)
	r.mu.Unlock()
}
