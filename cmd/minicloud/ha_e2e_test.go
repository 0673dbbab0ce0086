package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/peer"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// simHost is a SIMULATED hypervisor host (a fake: it boots nothing). It
// speaks the agent's protocol through the API like the real agent: it
// registers, heartbeats, follows its assignment stream (re-opened after any
// error, starting again from the full set) and reports every VM assigned to
// it RUNNING. It records every VM it was ever told to run, which is how the
// test finds a VM that two hosts would have booted.
type simHost struct {
	name string
	cl   *client.Client

	mu       sync.Mutex
	ran      map[string]bool // VM ids this host was told to run
	reopened int             // assignment streams re-opened after an error
	servedBy string          // API replica serving the current stream
	lastErr  error           // of a stream or report, for the failure message
}

func (h *simHost) setErr(err error) {
	h.mu.Lock()
	h.lastErr = err
	h.mu.Unlock()
}

func (h *simHost) register(ctx context.Context) {
	for ctx.Err() == nil {
		_, err := h.cl.Hosts.RegisterHost(ctx, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
			Meta:        &minicloudv1.ObjectMeta{Name: h.name},
			Address:     "127.0.0.1:1",
			Capacity:    &minicloudv1.Resources{Vcpus: 64, MemoryMib: 64 << 10, DiskGib: 1000},
			Hypervisors: []string{"tcg"},
		}})
		if err == nil {
			if _, err = h.cl.Hosts.Heartbeat(ctx, &minicloudv1.HeartbeatRequest{Name: h.name}); err == nil {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (h *simHost) run(ctx context.Context) {
	h.register(ctx)
	go func() {
		for ctx.Err() == nil {
			time.Sleep(2 * time.Second)
			if _, err := h.cl.Hosts.Heartbeat(ctx, &minicloudv1.HeartbeatRequest{Name: h.name}); errdefs.IsNotFound(err) {
				h.register(ctx)
			}
		}
	}()
	for ctx.Err() == nil {
		err := h.watch(ctx)
		if ctx.Err() != nil {
			return
		}
		h.mu.Lock()
		h.reopened++
		h.mu.Unlock()
		h.setErr(err)
		time.Sleep(200 * time.Millisecond)
	}
}

func (h *simHost) watch(ctx context.Context) error {
	s, err := h.cl.Hosts.WatchAssignments(ctx, &minicloudv1.WatchAssignmentsRequest{Host: h.name})
	if err != nil {
		return err
	}
	for {
		ev, err := s.Recv()
		if err != nil {
			return err
		}
		if p, ok := peer.FromContext(s.Context()); ok {
			h.mu.Lock()
			h.servedBy = p.Addr.String()
			h.mu.Unlock()
		}
		vm := ev.GetVm()
		switch ev.GetType() {
		case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, minicloudv1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED:
		default:
			continue
		}
		h.mu.Lock()
		h.ran[vm.GetMeta().GetId()] = true
		h.mu.Unlock()
		if vm.GetStatus().GetPhase() != minicloudv1.VMPhase_VM_PHASE_RUNNING {
			go h.report(ctx, vm.GetMeta().GetId())
		}
	}
}

// report moves the VM through CREATING to RUNNING as the agent does, each
// step until the API takes it (level-triggered: a later event for the VM
// would report again anyway).
func (h *simHost) report(ctx context.Context, id string) {
	for _, phase := range []minicloudv1.VMPhase{minicloudv1.VMPhase_VM_PHASE_CREATING, minicloudv1.VMPhase_VM_PHASE_RUNNING} {
		for ctx.Err() == nil {
			_, err := h.cl.Hosts.ReportVMStatus(ctx, &minicloudv1.ReportVMStatusRequest{
				Host: h.name, VmId: id, Status: &minicloudv1.VMStatus{Phase: phase},
			})
			if err != nil {
				h.setErr(fmt.Errorf("report %s %s: %w", id, phase, err))
			}
			// FailedPrecondition: past this phase already (a report
			// repeated after a re-opened stream), or no longer ours.
			if err == nil || errdefs.IsFailedPrecondition(err) {
				break
			}
			if errdefs.IsNotFound(err) {
				return
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
}

// TestE2EControlPlaneSurvivesLosingMembers: a control plane of 3 etcd
// members (real etcd processes), 2 API replicas and 2 scheduler replicas,
// with 3 simulated hosts. During a burst of 30 creates through the CLI
// (given both API addresses), one etcd member, one API replica and one
// scheduler replica are killed with SIGKILL, each at a different moment.
// Every create succeeds and its VM ends RUNNING on exactly one host; no VM
// exists twice; no address is given twice. (The lab runs the same burst
// with real agents and libvirt; this one needs neither root nor KVM.)
func TestE2EControlPlaneSurvivesLosingMembers(t *testing.T) {
	skipShort(t)
	etcd := cloudtest.StartEtcdCluster(t, 3)
	apis := cloudtest.StartAPIReplicasOn(t, etcd.URLs(), etcd.Client, 2)
	scheds := []*cloudtest.Proc{
		cloudtest.StartScheduler(t, "scheduler-a", etcd.URLs()),
		cloudtest.StartScheduler(t, "scheduler-b", etcd.URLs()),
	}
	both := *apis[0]
	both.Endpoint = cloudtest.Endpoints(apis)
	c := &cloud{Cloud: &both, t: t, home: t.TempDir()}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	disk := make([]byte, 1<<20)
	rand.Read(disk)
	file := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(file, disk, 0o644); err != nil {
		t.Fatal(err)
	}
	c.ok("flavor", "create", "small", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	c.ok("image", "create", "img", "--file", file)
	c.ok("network", "create", "default", "--cidr", "10.98.0.0/24")
	// 30 VMs: more than the default quota of 20 instances.
	c.ok("quota", "set", "default", "--instances", "40")

	cl, err := client.Dial(ctx, both.Endpoint, both.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var hosts []*simHost
	for i := range 3 {
		name := fmt.Sprintf("sim-%d", i)
		hcl, err := client.Dial(ctx, both.Endpoint, both.HostDialOptions(name)...)
		if err != nil {
			t.Fatal(err)
		}
		defer hcl.Close()
		h := &simHost{name: name, cl: hcl, ran: map[string]bool{}}
		hosts = append(hosts, h)
		go h.run(ctx)
	}
	// A VM created before any host is UP rightly fails with NoValidHost.
	for up := 0; up < len(hosts); {
		resp, err := cl.Hosts.ListHosts(ctx, &minicloudv1.ListHostsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		up = 0
		for _, h := range resp.GetHosts() {
			if h.GetState() == minicloudv1.HostState_HOST_STATE_UP {
				up++
			}
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The burst: 30 CLI creates, 5 at a time. Kills happen after the 8th,
	// 16th and 24th create has started.
	const n = 30
	kills := map[int]func(){
		8: func() { etcd.Members[0].Kill(); t.Log("killed etcd member m0") },
		16: func() {
			// The replica serving some host's assignment stream, so that
			// the test sees a stream move.
			victim := apis[0]
			for _, h := range hosts {
				h.mu.Lock()
				if h.servedBy == apis[1].Endpoint {
					victim = apis[1]
				}
				h.mu.Unlock()
			}
			victim.Kill()
			t.Logf("killed API replica %s", victim.Endpoint)
		},
		24: func() { scheds[0].Kill(); t.Log("killed scheduler-a") },
	}
	sem := make(chan struct{}, 5)
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range n {
		if kill := kills[i]; kill != nil {
			kill()
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r := c.mc("vm", "create", fmt.Sprintf("vm-%02d", i), "--image", "img", "--flavor", "small")
			if r.code != 0 {
				errs <- fmt.Sprintf("vm-%02d: exit %d: %s", i, r.code, r.stderr)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if t.Failed() {
		t.FailNow()
	}

	// Every VM ends RUNNING (the scheduler places it; its host reports).
	var vms []*minicloudv1.VM
	deadline := time.Now().Add(90 * time.Second)
	for {
		resp, err := cl.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{AllProjects: true})
		if err == nil {
			vms = resp.GetVms()
			running := 0
			for _, vm := range vms {
				if vm.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_RUNNING {
					running++
				}
			}
			if running == len(vms) && len(vms) >= n {
				break
			}
		}
		if time.Now().After(deadline) {
			var states []string
			for _, vm := range vms {
				if vm.GetStatus().GetPhase() != minicloudv1.VMPhase_VM_PHASE_RUNNING {
					states = append(states, fmt.Sprintf("%s %s on %q: %s: %s\n%s", vm.GetMeta().GetName(), vm.GetStatus().GetPhase(),
						vm.GetStatus().GetHost(), vm.GetStatus().GetReason(), vm.GetStatus().GetMessage(), c.mc("vm", "events", vm.GetMeta().GetName()).stdout))
				}
			}
			for _, h := range hosts {
				h.mu.Lock()
				states = append(states, fmt.Sprintf("host %s: %d VMs, last error: %v", h.name, len(h.ran), h.lastErr))
				h.mu.Unlock()
			}
			t.Fatalf("not every VM is RUNNING after the burst (%v):\n%s\nscheduler-a:\n%s\nscheduler-b:\n%s", err, strings.Join(states, "\n"), scheds[0].Log(), scheds[1].Log())
		}
		time.Sleep(500 * time.Millisecond)
	}

	// No VM exists twice: 30 VMs, one per name.
	names := map[string]int{}
	for _, vm := range vms {
		names[vm.GetMeta().GetName()]++
	}
	if len(vms) != n || len(names) != n {
		t.Errorf("%d VMs with %d names after %d creates, want %d of each", len(vms), len(names), n, n)
	}
	// No VM is run by two hosts, and each runs where its status says.
	ranOn := map[string][]string{}
	reopened := 0
	for _, h := range hosts {
		h.mu.Lock()
		for id := range h.ran {
			ranOn[id] = append(ranOn[id], h.name)
		}
		reopened += h.reopened
		h.mu.Unlock()
	}
	for _, vm := range vms {
		id := vm.GetMeta().GetId()
		if got := ranOn[id]; len(got) != 1 || got[0] != vm.GetStatus().GetHost() {
			t.Errorf("vm %s (status host %s) was assigned to hosts %v, want exactly its host", vm.GetMeta().GetName(), vm.GetStatus().GetHost(), got)
		}
	}
	if reopened == 0 {
		t.Error("no assignment stream was re-opened, though an API replica was killed")
	}
	// One capacity claim per VM, on its host.
	claims, err := etcd.Client.Get(ctx, store.ClaimPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	claimed := map[string][]string{}
	for _, kv := range claims.Kvs {
		parts := strings.Split(strings.TrimPrefix(string(kv.Key), store.ClaimPrefix), "/")
		claimed[parts[1]] = append(claimed[parts[1]], parts[0])
	}
	for _, vm := range vms {
		if got := claimed[vm.GetMeta().GetId()]; len(got) != 1 || got[0] != vm.GetStatus().GetHost() {
			t.Errorf("vm %s: claims on hosts %v, want one on %s", vm.GetMeta().GetName(), got, vm.GetStatus().GetHost())
		}
	}
	if len(claimed) != n {
		t.Errorf("claims for %d VMs, want %d", len(claimed), n)
	}
	// No address given twice, and none allocated to no VM.
	ips := map[string][]string{}
	for _, vm := range vms {
		for _, a := range vm.GetStatus().GetAddresses() {
			ips[a.GetIp()] = append(ips[a.GetIp()], vm.GetMeta().GetName())
		}
	}
	var dup []string
	for ip, who := range ips {
		if len(who) != 1 {
			dup = append(dup, fmt.Sprintf("%s: %v", ip, who))
		}
	}
	sort.Strings(dup)
	if len(dup) > 0 || len(ips) != n {
		t.Errorf("%d addresses for %d VMs; given twice: %v", len(ips), n, dup)
	}
	alloc, err := etcd.Client.Get(ctx, store.IPAMPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if alloc.Count != int64(n) {
		t.Errorf("%d address allocations in etcd for %d VMs (leaked or lost)", alloc.Count, n)
	}
}
