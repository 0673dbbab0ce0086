package main

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/store"
)

func TestRunSchedulerRejectsBadFlags(t *testing.T) {
	good := schedulerOptions{maxAttempts: 3, weigher: "spread", workers: 4, sampleSize: 64}
	for _, tt := range []struct {
		name string
		edit func(o *schedulerOptions)
		want string
	}{
		{"weigher", func(o *schedulerOptions) { o.weigher = "balanced" }, "--weigher"},
		{"sample size", func(o *schedulerOptions) { o.sampleSize = 0 }, "--sample-size"},
		{"max attempts", func(o *schedulerOptions) { o.maxAttempts = 0 }, "--max-attempts"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := good
			tt.edit(&o)
			err := runScheduler(context.Background(), nil, slog.New(slog.NewTextHandler(io.Discard, nil)), o)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one naming %s", err, tt.want)
			}
		})
	}
}

// TestRunSchedulerPlacesAndStops runs the role on a real embedded etcd
// with one simulated host (registration and alive key written directly)
// and one VM written as the API writes it, then stops it with ctx.
func TestRunSchedulerPlacesAndStops(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	host, _ := proto.Marshal(&minicloudv1.Host{Meta: &minicloudv1.ObjectMeta{Name: "sim-1"}, Capacity: &minicloudv1.Resources{Vcpus: 2, MemoryMib: 2048, DiskGib: 10}, Hypervisors: []string{"tcg"}})
	spec, _ := proto.Marshal(&minicloudv1.VM{Meta: &minicloudv1.ObjectMeta{Id: "vm1", Name: "vm1", Project: "default"}, Spec: &minicloudv1.VMSpec{Resources: &minicloudv1.Resources{Vcpus: 1, MemoryMib: 512, DiskGib: 1}}})
	status, _ := proto.Marshal(&minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_PENDING})
	if _, err := cli.Txn(ctx).Then(
		clientv3.OpPut(store.HostSpecKey("sim-1"), string(host)), clientv3.OpPut(store.HostAliveKey("sim-1"), "simulated"),
		clientv3.OpPut(store.VMSpecKey("vm1"), string(spec)), clientv3.OpPut(store.VMStatusKey("vm1"), string(status)),
	).Commit(); err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- runScheduler(rctx, cli, slog.New(slog.NewTextHandler(io.Discard, nil)),
			schedulerOptions{maxAttempts: 3, weigher: "pack", workers: 2, sampleSize: -1, metricsListen: "127.0.0.1:0"})
	}()
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	resp, err := cli.Get(wctx, store.VMStatusKey("vm1"))
	if err != nil {
		t.Fatal(err)
	}
	placed := false
	for wr := range cli.Watch(wctx, store.VMStatusKey("vm1"), clientv3.WithRev(resp.Header.Revision+1)) {
		for _, ev := range wr.Events {
			st := &minicloudv1.VMStatus{}
			_ = proto.Unmarshal(ev.Kv.Value, st)
			if st.GetPhase() == minicloudv1.VMPhase_VM_PHASE_SCHEDULED && st.GetHost() == "sim-1" {
				placed = true
				wcancel()
			}
		}
	}
	if !placed {
		t.Fatal("vm1 was not scheduled within 30s")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("runScheduler after cancel: %v", err)
	}
}
