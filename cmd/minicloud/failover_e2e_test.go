package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestE2EFailoverBetweenAPIReplicas runs two `minicloudd api` processes on
// one etcd and one image store. Clients given both addresses keep working
// when the replica they were using is killed with SIGKILL mid-sequence: a
// long-lived client's calls, the CLI, an image uploaded through the dead
// replica, and a host's assignment stream, which re-opens on the other
// replica and starts again from the full set.
func TestE2EFailoverBetweenAPIReplicas(t *testing.T) {
	skipShort(t)
	reps := cloudtest.StartAPIReplicas(t, 2)
	// The CLI gets both replicas (a copy: reps[0] keeps its own address).
	both := *reps[0]
	both.Endpoint = cloudtest.Endpoints(reps)
	c := &cloud{Cloud: &both, t: t, home: t.TempDir()}
	ctx := context.Background()

	disk := make([]byte, 1<<20+3)
	rand.Read(disk)
	sum := sha256.Sum256(disk)
	file := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(file, disk, 0o644); err != nil {
		t.Fatal(err)
	}
	c.ok("flavor", "create", "small", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	c.ok("image", "create", "img", "--file", file)
	c.ok("network", "create", "default", "--cidr", "10.99.0.0/24")
	c.ok("vm", "create", "vm1", "--image", "img", "--flavor", "small")

	cl, err := client.Dial(ctx, c.Endpoint, c.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	// A host with vm1 assigned to it (as the scheduler would do).
	h1, err := client.Dial(ctx, c.Endpoint, c.HostDialOptions("h1")...)
	if err != nil {
		t.Fatal(err)
	}
	defer h1.Close()
	if _, err := h1.Hosts.RegisterHost(ctx, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta:        &minicloudv1.ObjectMeta{Name: "h1"},
		Address:     "127.0.0.1:1",
		Capacity:    &minicloudv1.Resources{Vcpus: 4, MemoryMib: 4096, DiskGib: 10},
		Hypervisors: []string{"tcg"},
	}}); err != nil {
		t.Fatal(err)
	}
	vm, err := cl.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: "vm1", Project: "default"})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := proto.Marshal(&minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_CREATING, Host: "h1"})
	if _, err := c.Etcd.Put(ctx, store.VMStatusKey(vm.GetMeta().GetId()), string(st)); err != nil {
		t.Fatal(err)
	}

	// watch opens the assignment stream, reads it up to its BOOKMARK and
	// returns it with the replica that serves it.
	watch := func() (minicloudv1.HostService_WatchAssignmentsClient, string) {
		t.Helper()
		s, err := h1.Hosts.WatchAssignments(ctx, &minicloudv1.WatchAssignmentsRequest{Host: "h1"})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for {
			ev, err := s.Recv()
			if err != nil {
				t.Fatalf("assignment stream: %v", err)
			}
			if ev.GetType() == minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK {
				break
			}
			got = append(got, ev.GetVm().GetMeta().GetName())
		}
		if strings.Join(got, ",") != "vm1" {
			t.Fatalf("assignments before the bookmark: %v, want vm1", got)
		}
		p, ok := peer.FromContext(s.Context())
		if !ok {
			t.Fatal("no peer in the stream's context")
		}
		return s, p.Addr.String()
	}
	stream, served := watch()
	victim, survivor := reps[0], reps[1]
	if served == reps[1].Endpoint {
		victim, survivor = reps[1], reps[0]
	} else if served != reps[0].Endpoint {
		t.Fatalf("stream served by %s, neither replica", served)
	}

	for i := range 30 {
		if i == 10 {
			victim.Kill() // SIGKILL, mid-sequence
		}
		if _, err := cl.Flavors.GetFlavor(ctx, &minicloudv1.GetFlavorRequest{Name: "small"}); err != nil {
			t.Fatalf("call %d (replica %s killed at call 10): %v", i, victim.Endpoint, err)
		}
		if _, err := cl.Images.ListImages(ctx, &minicloudv1.ListImagesRequest{}); err != nil {
			t.Fatalf("call %d (replica %s killed at call 10): %v", i, victim.Endpoint, err)
		}
	}

	// The stream on the dead replica ends; re-opened, it is served by the
	// survivor and starts again from the full set.
	if _, err := stream.Recv(); !errdefs.IsUnavailable(err) {
		t.Fatalf("stream on the killed replica: got %v, want unavailable", err)
	}
	if _, served := watch(); served != survivor.Endpoint {
		t.Fatalf("re-opened stream served by %s, want the survivor %s", served, survivor.Endpoint)
	}

	// The CLI with both addresses, the dead one first, still works.
	c.Endpoint = victim.Endpoint + "," + survivor.Endpoint
	c.ok("vm", "create", "vm2", "--image", "img", "--flavor", "small")
	if out := c.ok("vm", "list"); !strings.Contains(out, "vm1") || !strings.Contains(out, "vm2") {
		t.Fatalf("vm list after failover:\n%s", out)
	}

	// The image uploaded through whichever replica is served, intact, by
	// the survivor.
	dl, err := cl.Images.DownloadImage(ctx, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Sha256: hex.EncodeToString(sum[:])})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	for {
		msg, err := dl.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("download after failover: %v", err)
		}
		buf.Write(msg.GetData())
	}
	if got := sha256.Sum256(buf.Bytes()); got != sum {
		t.Fatalf("downloaded image has sha256 %x, want %x", got, sum)
	}

	// Only the survivor is left: with it gone too, the CLI says so.
	survivor.Kill()
	c.fails(exitUnavailable, "cannot reach", "flavor", "list")
}
