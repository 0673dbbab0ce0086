package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/pki"
)

// TestLabHostsAndVMs: every host registered with its own capacity (the
// agent's overrides, not the machine's), and each host's VM runs in that
// host's own libvirtd and in no other.
func TestLabHostsAndVMs(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	hosts, err := c.Hosts.ListHosts(ctx, &minicloudv1.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts.Hosts) != l.Hosts {
		t.Fatalf("%d hosts registered, want %d: %v", len(hosts.Hosts), l.Hosts, hosts.Hosts)
	}
	for _, h := range hosts.Hosts {
		name := h.GetMeta().GetName()
		want := l.HostCapacity(name)
		got := h.GetCapacity()
		if int(got.GetVcpus()) != want.VCPUs || got.GetMemoryMib() != want.MemoryMiB || got.GetDiskGib() != want.DiskGiB {
			t.Errorf("host %s capacity %d vCPU %d MiB %d GiB, want %+v", name, got.GetVcpus(), got.GetMemoryMib(), got.GetDiskGib(), want)
		}
		if h.State != minicloudv1.HostState_HOST_STATE_UP {
			t.Errorf("host %s is %s", name, h.State)
		}
		if want := netip.AddrPortFrom(l.HostAddr(name), 8642).String(); h.Address != want {
			t.Errorf("host %s advertises %s, want its underlay address %s", name, h.Address, want)
		}
		if h.TunnelIp != l.HostAddr(name).String() {
			t.Errorf("host %s tunnel address %q, want its underlay address %s", name, h.TunnelIp, l.HostAddr(name))
		}
		// It joined with proof: a certificate of the cluster CA for its
		// own name, kept in its own data directory.
		cert, err := pki.ParseCert(mustRead(t, filepath.Join(l.Dir, "hosts", name, "data", "agent", "pki", "host.crt")))
		if err != nil {
			t.Fatal(err)
		}
		if cert.Subject.CommonName != name || !pki.HasOrg(cert, pki.OrgHosts) {
			t.Errorf("host %s holds a certificate for %q %v", name, cert.Subject.CommonName, cert.Subject.Organization)
		}
	}

	for _, h := range l.HostNames() {
		vm, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: lab.VMName(h)})
		if err != nil {
			t.Fatal(err)
		}
		id := vm.GetMeta().GetId()
		vmIDs = append(vmIDs, id)
		if p, on := vm.GetStatus().GetPhase(), vm.GetStatus().GetHost(); p != minicloudv1.VMPhase_VM_PHASE_RUNNING || on != h {
			t.Errorf("%s is %s on %q, want RUNNING on %s", lab.VMName(h), p, on, h)
		}
		for _, other := range l.HostNames() {
			state, err := l.Output(ctx, other, "virsh", "domstate", "mc-"+id)
			switch {
			case other == h && (err != nil || strings.TrimSpace(state) != "running"):
				t.Errorf("%s in %s's libvirt: %q, %v; want running", lab.VMName(h), h, strings.TrimSpace(state), err)
			case other != h && err == nil:
				t.Errorf("%s is also defined in %s's libvirt (%s)", lab.VMName(h), other, strings.TrimSpace(state))
			}
		}
	}
}

// TestLabGuestsCannotReachTheUnderlay: every agent was given the underlay
// as a protected network, so its guests reach no control-plane port.
func TestLabGuestsCannotReachTheUnderlay(t *testing.T) {
	l := Shared(t)
	for _, h := range l.HostNames() {
		out, err := l.Output(context.Background(), h, "nft", "list", "chain", "inet", "minicloud", "forward")
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("ip daddr %s", l.Subnet)
		if !strings.Contains(out, want) || !strings.Contains(out, "may not reach management network") {
			t.Errorf("%s: no rule keeping guests off the underlay (%q) in:\n%s", h, want, out)
		}
	}
}

// TestLabGuestsServedByTheirOwnHost: each host's agent runs its own DHCP
// and metadata service: every VM gets its address and reads its metadata
// (GuestReady, set when the host's metadata service first answers it).
func TestLabGuestsServedByTheirOwnHost(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(5 * time.Minute) // TCG boots on a shared machine
	for _, h := range l.HostNames() {
		for {
			vm, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: lab.VMName(h)})
			if err != nil {
				t.Fatal(err)
			}
			ready := false
			for _, cond := range vm.GetStatus().GetConditions() {
				ready = ready || (cond.GetType() == lifecycle.ConditionGuestReady && cond.GetStatus())
			}
			if ready {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s on %s never read its metadata: %v", lab.VMName(h), h, vm.GetStatus().GetConditions())
			}
			time.Sleep(2 * time.Second)
		}
	}
}

// reachesAPI says whether a TCP connection from inside host to the first
// API replica succeeds.
func reachesAPI(l *lab.Lab, host string) bool {
	_, err := l.Output(context.Background(), host, "timeout", "3", "bash", "-c", "echo > /dev/tcp/"+strings.Replace(l.APIEndpoints()[0], ":", "/", 1))
	return err == nil
}

// TestLabPartitionAndHeal: partition cuts a host off the control plane
// (and the API sees it go DOWN); heal brings it back UP.
func TestLabPartitionAndHeal(t *testing.T) {
	l := Shared(t)
	h := l.HostNames()[len(l.HostNames())-1]
	if !reachesAPI(l, h) {
		t.Fatalf("%s cannot reach the API before the partition", h)
	}
	if err := l.Partition(h); err != nil {
		t.Fatal(err)
	}
	healed := false
	defer func() {
		if !healed {
			_ = l.Heal(h)
		}
	}()
	if reachesAPI(l, h) {
		t.Errorf("%s still reaches the API while partitioned", h)
	}
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_UNREACHABLE)
	if err := l.Heal(h); err != nil {
		t.Fatal(err)
	}
	healed = true
	if !reachesAPI(l, h) {
		t.Errorf("%s cannot reach the API after heal", h)
	}
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_UP)
}

// TestLabStopAndStartHost: stop powers a host off (no process of it is
// left, QEMU included), start boots it with its VM still defined in its
// own libvirt.
func TestLabStopAndStartHost(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	h := l.HostNames()[len(l.HostNames())-1]
	if err := l.StopHost(ctx, h); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Output(ctx, h, "virsh", "list"); err == nil {
		t.Errorf("%s's libvirtd still answers after stop", h)
	}
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_UNREACHABLE)
	if err := l.StartHost(ctx, h); err != nil {
		t.Fatal(err)
	}
	waitHostState(t, l, h, minicloudv1.HostState_HOST_STATE_UP)
	out, err := l.Output(ctx, h, "virsh", "list", "--all", "--name")
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	vm, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: lab.VMName(h)})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "mc-"+vm.GetMeta().GetId()) {
		t.Errorf("%s's domain is gone from %s's libvirt after a power cycle:\n%s", lab.VMName(h), h, out)
	}
	// Put the lab back as it was for the next test: the VM running. A
	// host's VMs come back shut off after a power cycle (as in Nova
	// without resume_guests_state_on_host_boot) and are started here; if
	// the agent ever restarts them itself, that is fine too.
	domain := "mc-" + vm.GetMeta().GetId()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		v, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: lab.VMName(h)})
		if err != nil {
			t.Fatal(err)
		}
		state, _ := l.Output(ctx, h, "virsh", "domstate", domain)
		if v.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_STOPPED {
			if _, err := c.VMs.StartVM(ctx, &minicloudv1.VMActionRequest{Name: lab.VMName(h)}); err != nil {
				t.Fatal(err)
			}
			break
		}
		if strings.TrimSpace(state) == "running" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is %s, its domain %q, 5m after its host booted", lab.VMName(h), v.GetStatus().GetPhase(), strings.TrimSpace(state))
		}
		time.Sleep(time.Second)
	}
	if _, err := l.WaitVM(ctx, lab.VMName(h), minicloudv1.VMPhase_VM_PHASE_RUNNING, 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	if state, err := l.Output(ctx, h, "virsh", "domstate", domain); err != nil || strings.TrimSpace(state) != "running" {
		t.Errorf("%s RUNNING, but its domain on %s is %q (%v)", lab.VMName(h), h, strings.TrimSpace(state), err)
	}
}

func waitHostState(t *testing.T, l *lab.Lab, host string, want minicloudv1.HostState) {
	t.Helper()
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		h, err := c.Hosts.GetHost(ctx, &minicloudv1.GetHostRequest{Name: host})
		if err == nil && h.State == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("host %s is not %s after 3m (%v, %v)", host, want, h.GetState(), err)
		}
		time.Sleep(time.Second)
	}
}

// TestLabKillAndRestartControlPlane: each replicated piece can be killed
// (SIGKILL) and restarted by name, and the cluster keeps answering on the
// surviving members meanwhile: the handles the fail-over tests use.
func TestLabKillAndRestartControlPlane(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, name := range []string{"etcd2", "api2", "scheduler2"} {
		if err := l.Kill(name); err != nil {
			t.Fatal(err)
		}
		restarted := false
		defer func() {
			if !restarted {
				_ = l.Restart(ctx, name)
			}
		}()
		// Killing etcd's leader costs an election (a call in flight
		// fails with "leader changed"); then the survivors answer.
		deadline := time.Now().Add(time.Minute)
		for {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			hosts, err := c.Hosts.ListHosts(cctx, &minicloudv1.ListHostsRequest{})
			cancel()
			if err == nil && len(hosts.Hosts) == l.Hosts {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("with %s killed, the API answers %v, %v", name, hosts, err)
			}
			time.Sleep(time.Second)
		}
		if err := l.Restart(ctx, name); err != nil {
			t.Fatal(err)
		}
		restarted = true
	}
	// api2 serves again, against the same cluster.
	c2, err := l.ClientOf(ctx, l.APIEndpoints()[1])
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: lab.VMName(l.HostNames()[0])}); err != nil {
		t.Errorf("restarted api2: %v", err)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
