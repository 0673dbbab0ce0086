package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"google.golang.org/protobuf/proto"
)

// partitionFor is how long a partition lasts: longer than the hosts'
// heartbeat lease (15 s, api/server.HostLeaseTTL), so the control plane
// sees the host UNREACHABLE and the host may fence itself.
const partitionFor = 25 * time.Second

// env is what a scenario acts on.
type env struct {
	l    *lab.Lab
	c    *client.Client
	rnd  *rand.Rand
	seq  int
	logf func(format string, args ...any)
}

// outcome is what a scenario did: when its fault began, the VMs it had
// created (accepted creates) and the ids it deleted.
type outcome struct {
	host    string
	faultAt time.Time
	created []string
	deleted []string
	// note is shown beside the target (e.g. how long an evacuation took).
	note string
}

// scenario injects one fault while the cloud works, then undoes it (a
// killed process is restarted, a partition healed, a host started).
type scenario struct {
	name string
	run  func(ctx context.Context, e *env, host string) (outcome, error)
}

var scenarios = []scenario{
	{"kill -9 an agent mid-create", agentKillMidCreate},
	{"kill -9 an agent mid-delete", agentKillMidDelete},
	{"stop a host's libvirtd", libvirtdStop},
	{"partition a host longer than the lease, heal", partitionHeal},
	{"partition a host until its VMs are evacuated, heal", partitionEvacuateHeal},
	{"stop and start a host", stopStartHost},
	{"kill an etcd member and an API replica during a burst", burstKills},
}

// name returns a fresh VM name for this run.
func (e *env) name() string {
	e.seq++
	return fmt.Sprintf("chaos-%03d", e.seq)
}

// create creates n tiny VMs (on host, if not ""), each retried under its request
// id until accepted or 3 minutes pass, all at once; it returns the names
// accepted.
func (e *env) create(ctx context.Context, n int, host string) ([]string, error) {
	return e.createSpec(ctx, n, &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny", TargetHost: host})
}

// createSpec is create with each VM's spec a copy of spec.
func (e *env) createSpec(ctx context.Context, n int, spec *minicloudv1.VMSpec) ([]string, error) {
	names := make([]string, n)
	for i := range names {
		names[i] = e.name()
	}
	var mu sync.Mutex
	var accepted []string
	var errs []error
	var wg sync.WaitGroup
	for _, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deadline := time.Now().Add(3 * time.Minute)
			for {
				cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				_, err := e.c.VMs.CreateVM(cctx, &minicloudv1.CreateVMRequest{Name: name, RequestId: "chaos-" + name,
					Spec: proto.Clone(spec).(*minicloudv1.VMSpec)})
				cancel()
				mu.Lock()
				switch {
				case err == nil || errdefs.IsAlreadyExists(err):
					accepted = append(accepted, name)
				case time.Now().After(deadline) || ctx.Err() != nil:
					errs = append(errs, fmt.Errorf("create %s: %w", name, err))
				default:
					mu.Unlock()
					time.Sleep(time.Second)
					continue
				}
				mu.Unlock()
				return
			}
		}()
	}
	wg.Wait()
	return accepted, errors.Join(errs...)
}

// waitRunning waits for every named VM to run.
func (e *env) waitRunning(ctx context.Context, names []string) ([]string, error) {
	var ids []string
	for _, n := range names {
		vm, err := e.l.WaitVM(ctx, n, minicloudv1.VMPhase_VM_PHASE_RUNNING, 5*time.Minute)
		if err != nil {
			return ids, err
		}
		ids = append(ids, vm.GetMeta().GetId())
	}
	return ids, nil
}

// remove deletes the named VMs and waits until they are gone.
func (e *env) remove(ctx context.Context, names []string) error {
	for _, n := range names {
		if _, err := e.c.VMs.DeleteVM(ctx, &minicloudv1.DeleteVMRequest{Name: n}); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("delete %s: %w", n, err)
		}
	}
	return e.waitGone(ctx, names)
}

func (e *env) waitGone(ctx context.Context, names []string) error {
	deadline := time.Now().Add(5 * time.Minute)
	for _, n := range names {
		for {
			_, err := e.c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: n})
			if errdefs.IsNotFound(err) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s not deleted after 5m (%v)", n, err)
			}
			time.Sleep(time.Second)
		}
	}
	return nil
}

// sleep waits between lo and hi (seeded), or until ctx ends.
func (e *env) sleep(ctx context.Context, lo, hi time.Duration) {
	d := lo + time.Duration(e.rnd.Int63n(int64(hi-lo)+1))
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func agentKillMidCreate(ctx context.Context, e *env, host string) (outcome, error) {
	o := outcome{host: host}
	var created []string
	var cerr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		created, cerr = e.create(ctx, 2, host)
	}()
	e.sleep(ctx, 500*time.Millisecond, 3*time.Second)
	o.faultAt = time.Now()
	err := e.l.Kill(host + "-agent")
	<-done
	o.created = created
	if err != nil {
		return o, err
	}
	if err := e.l.Restart(ctx, host+"-agent"); err != nil {
		return o, err
	}
	return o, cerr
}

func agentKillMidDelete(ctx context.Context, e *env, host string) (outcome, error) {
	o := outcome{host: host}
	names, err := e.create(ctx, 2, host)
	if err != nil {
		return o, err
	}
	ids, err := e.waitRunning(ctx, names)
	if err != nil {
		o.created = names
		return o, err
	}
	for _, n := range names {
		if _, err := e.c.VMs.DeleteVM(ctx, &minicloudv1.DeleteVMRequest{Name: n}); err != nil {
			o.created = names
			return o, fmt.Errorf("delete %s: %w", n, err)
		}
	}
	o.deleted = ids
	e.sleep(ctx, 0, time.Second)
	o.faultAt = time.Now()
	if err := e.l.Kill(host + "-agent"); err != nil {
		return o, err
	}
	if err := e.l.Restart(ctx, host+"-agent"); err != nil {
		return o, err
	}
	return o, e.waitGone(ctx, names)
}

func libvirtdStop(ctx context.Context, e *env, host string) (outcome, error) {
	o := outcome{host: host}
	o.faultAt = time.Now()
	if err := e.l.Kill(host + "-libvirtd"); err != nil {
		return o, err
	}
	// Work for the host while its libvirtd is away.
	created, cerr := e.create(ctx, 1, host)
	o.created = created
	e.sleep(ctx, 5*time.Second, 10*time.Second)
	if err := e.l.Restart(ctx, host+"-libvirtd"); err != nil {
		return o, err
	}
	return o, cerr
}

func partitionHeal(ctx context.Context, e *env, host string) (outcome, error) {
	o := outcome{host: host, faultAt: time.Now()}
	if err := e.l.Partition(host); err != nil {
		return o, err
	}
	e.sleep(ctx, partitionFor, partitionFor+5*time.Second)
	return o, e.l.Heal(host)
}

// partitionEvacuateHeal: two VMs on host ask to be evacuated
// (on_host_failure evacuate); host is cut off until both run on other
// hosts (it fences itself, the control plane counts it FENCED and rebuilds
// them), then healed: it must remove its old copies.
func partitionEvacuateHeal(ctx context.Context, e *env, host string) (outcome, error) {
	o := outcome{host: host}
	names, err := e.createSpec(ctx, 2, &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny", TargetHost: host,
		OnHostFailure: minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE})
	o.created = names
	if err != nil {
		return o, err
	}
	if _, err := e.waitRunning(ctx, names); err != nil {
		return o, err
	}
	o.faultAt = time.Now()
	if err := e.l.Partition(host); err != nil {
		return o, err
	}
	moved := poll(ctx, 5*time.Minute, func() error {
		for _, n := range names {
			vm, err := e.c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: n})
			if err != nil {
				return err
			}
			if st := vm.GetStatus(); st.GetHost() == host || st.GetPhase() != minicloudv1.VMPhase_VM_PHASE_RUNNING {
				return fmt.Errorf("%s is %s on %s", n, st.GetPhase(), st.GetHost())
			}
		}
		return nil
	})
	if moved == nil {
		o.note = fmt.Sprintf("2 VMs running elsewhere %s after the cut", time.Since(o.faultAt).Round(time.Second))
	} else {
		moved = fmt.Errorf("not evacuated 5m after the cut: %w", moved)
	}
	return o, errors.Join(moved, e.l.Heal(host))
}

func stopStartHost(ctx context.Context, e *env, host string) (outcome, error) {
	o := outcome{host: host, faultAt: time.Now()}
	if err := e.l.StopHost(ctx, host); err != nil {
		return o, err
	}
	e.sleep(ctx, 2*time.Second, 8*time.Second)
	// What its VMs do when it is back (shut off with a reason, or started
	// by their restart policy) is the cloud's to decide: the table counts
	// the ones not RUNNING, and the clean-up after the audit starts them.
	return o, e.l.StartHost(ctx, host)
}

// startStopped starts every VM of host that is STOPPED though its spec
// asks for it running, and waits until they run.
func (e *env) startStopped(ctx context.Context, host string) error {
	return poll(ctx, 3*time.Minute, func() error {
		list, err := e.c.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{AllProjects: true})
		if err != nil {
			return err
		}
		var pending error
		for _, vm := range list.GetVms() {
			if vm.GetStatus().GetHost() != host || vm.GetSpec().GetPowerState() == minicloudv1.PowerState_POWER_STATE_STOPPED {
				continue
			}
			switch vm.GetStatus().GetPhase() {
			case minicloudv1.VMPhase_VM_PHASE_STOPPED:
				// Until it runs: a start asked for is not a VM back.
				pending = fmt.Errorf("%s is STOPPED", vm.GetMeta().GetName())
				if _, err := e.c.VMs.StartVM(ctx, &minicloudv1.VMActionRequest{Name: vm.GetMeta().GetName(), Project: vm.GetMeta().GetProject()}); err != nil {
					pending = fmt.Errorf("start %s: %w", vm.GetMeta().GetName(), err)
				}
			case minicloudv1.VMPhase_VM_PHASE_RUNNING:
			default:
				pending = fmt.Errorf("%s is %s", vm.GetMeta().GetName(), vm.GetStatus().GetPhase())
			}
		}
		return pending
	})
}

func burstKills(ctx context.Context, e *env, _ string) (outcome, error) {
	var o outcome
	etcd := fmt.Sprintf("etcd%d", 1+e.rnd.Intn(3))
	api := fmt.Sprintf("api%d", 1+e.rnd.Intn(2))
	o.host = etcd + ", " + api
	var created []string
	var cerr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		created, cerr = e.create(ctx, 6, "")
	}()
	e.sleep(ctx, 200*time.Millisecond, time.Second)
	o.faultAt = time.Now()
	kerr := e.l.Kill(etcd)
	e.sleep(ctx, 500*time.Millisecond, 2*time.Second)
	kerr = errors.Join(kerr, e.l.Kill(api))
	<-done
	o.created = created
	for _, p := range []string{etcd, api} {
		kerr = errors.Join(kerr, e.l.Restart(ctx, p))
	}
	return o, errors.Join(kerr, cerr)
}

// poll calls f every second until it returns nil or timeout passes.
func poll(ctx context.Context, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
