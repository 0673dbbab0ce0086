package agent

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestImageRecordsShareOneCall: ten VMs of one image created at once ask
// the API once, and a caller whose context ends leaves the others waiting
// for the call.
func TestImageRecordsShareOneCall(t *testing.T) {
	var calls atomic.Int32
	release := make(chan struct{})
	r := newImageRecords(func(ctx context.Context, name string) (*minicloudv1.Image, error) {
		calls.Add(1)
		<-release
		return &minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Name: name}}, nil
	})
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			img, err := r.lookup(context.Background(), fmt.Sprint("vm", i), "tiny")
			if err == nil && img.GetMeta().GetName() != "tiny" {
				err = fmt.Errorf("got image %q", img.GetMeta().GetName())
			}
			errs <- err
		}()
	}
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.lookup(gone, "vm-gone", "tiny"); err == nil {
		t.Error("a caller whose context ended got an answer")
	}
	time.Sleep(20 * time.Millisecond) // let the rest join the call
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("%d GetImage calls for ten concurrent lookups, want 1", n)
	}
	if _, err := r.lookup(context.Background(), "vm3", "tiny"); err != nil || calls.Load() != 1 {
		t.Errorf("a pinned VM asked again (%d calls, %v)", calls.Load(), err)
	}
	r.forget("vm3")
	if _, err := r.lookup(context.Background(), "vm3", "tiny"); err != nil || calls.Load() != 2 {
		t.Errorf("a forgotten VM did not ask again (%d calls, %v)", calls.Load(), err)
	}
}

// TestANewVMTakesThePinOfAnAliveVM: a VM whose image another VM of the
// host is pinned to asks the API nothing while that VM is alive (still
// assigned on the same stream), and asks once it is not.
func TestANewVMTakesThePinOfAnAliveVM(t *testing.T) {
	var calls atomic.Int32
	r := newImageRecords(func(ctx context.Context, name string) (*minicloudv1.Image, error) {
		calls.Add(1)
		return &minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Name: name, Id: fmt.Sprint(calls.Load())}}, nil
	})
	alive := map[string]bool{"vm1": true}
	r.alive = func(vmID, other string) bool { return alive[other] }
	ctx := context.Background()
	first, err := r.lookup(ctx, "vm1", "tiny")
	if err != nil {
		t.Fatal(err)
	}
	if img, err := r.lookup(ctx, "vm2", "tiny"); err != nil || img != first || calls.Load() != 1 {
		t.Fatalf("vm2 got %v (%v) after %d calls; want vm1's record, no call", img, err, calls.Load())
	}
	if _, err := r.lookup(ctx, "vm3", "other"); err != nil || calls.Load() != 2 {
		t.Fatalf("another image: %d calls (%v), want 2", calls.Load(), err)
	}
	// vm1 and vm2 gone from the stream (their pins not dropped yet): a
	// new VM asks.
	alive = map[string]bool{}
	if img, err := r.lookup(ctx, "vm4", "tiny"); err != nil || img == first || calls.Load() != 3 {
		t.Fatalf("vm4 got %v (%v) after %d calls; want a fresh record from a third call", img, err, calls.Load())
	}
}
