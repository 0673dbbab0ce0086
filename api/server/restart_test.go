package server_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestRestartDuringCreatesLosesNothing kills the API server while 8
// clients create VMs, starts a new one, and lets the clients retry their
// failed creates with the same request ids. Afterwards every request made
// exactly one VM and the store holds no half-created VM.
func TestRestartDuringCreatesLosesNothing(t *testing.T) {
	e := newEnv(t)
	e.seed()
	if _, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "big", Cidr: "10.60.0.0/22"}); err != nil {
		t.Fatal(err)
	}
	const workers, perWorker = 8, 12
	var (
		mu        sync.RWMutex
		client    = e.vms
		created   atomic.Int64
		retried   atomic.Int64
		killAfter = make(chan struct{})
		once      sync.Once
		wg        sync.WaitGroup
		ids       sync.Map // request id → VM id
	)
	current := func() minicloudv1.VMServiceClient { mu.RLock(); defer mu.RUnlock(); return client }
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWorker {
				req := &minicloudv1.CreateVMRequest{Name: fmt.Sprintf("w%d-%d", w, i), RequestId: fmt.Sprintf("r%d-%d", w, i),
					Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny", Networks: []string{"big"}}}
				for attempt := 0; ; attempt++ {
					vm, err := current().CreateVM(ctx(t), req)
					if err == nil {
						ids.Store(req.RequestId, vm.Meta.Id)
						if created.Add(1) == workers*perWorker/3 {
							once.Do(func() { close(killAfter) })
						}
						break
					}
					switch statusCode(err) {
					case codes.Unavailable, codes.Canceled:
						retried.Add(1)
						if attempt > 1000 {
							t.Errorf("%s: still failing: %v", req.Name, err)
							return
						}
						time.Sleep(10 * time.Millisecond) // back off while the server is down
					default:
						t.Errorf("%s: %v", req.Name, err)
						return
					}
				}
			}
		}()
	}
	<-killAfter
	mu.Lock()
	e.stop()
	e.start()
	client = e.vms
	mu.Unlock()
	wg.Wait()
	if t.Failed() {
		return
	}

	byID := e.checkConsistent()
	if len(byID) != workers*perWorker {
		t.Fatalf("%d VMs exist after %d creates", len(byID), workers*perWorker)
	}
	ids.Range(func(k, v any) bool {
		if byID[v.(string)] == nil {
			t.Errorf("request %s was answered with VM %s, which does not exist", k, v)
		}
		return true
	})
	t.Logf("%d creates, %d retried across the restart", workers*perWorker, retried.Load())
}
