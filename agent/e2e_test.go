package agent_test

// End-to-end tests of the VM lifecycle on this host: the real minicloudd
// all-in-one (API, scheduler, agent, metadata) as a child process, real
// libvirt and QEMU (TCG here), real bridges, taps and nftables, and the
// tiny guest image built from Debian packages by hack/images/build-tiny.sh.
// What the host holds is checked against libvirt and the kernel, not
// against minicloud's own records.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/nic"
	"github.com/minicloud/minicloud/pkg/store"
)

func requireHypervisorHost(t *testing.T) {
	t.Helper()
	cloudtest.RequireHypervisorHost(t)
}

func TestMain(m *testing.M) {
	code := m.Run()
	cloudtest.RemoveBinaries()
	os.Exit(code)
}

// newTinyCloud starts a cloud with a network of its own, flavor tiny and
// image tiny.
func newTinyCloud(t *testing.T) *cloudtest.Cloud {
	t.Helper()
	requireHypervisorHost(t)
	return newCloudWithImage(t, "tiny", cloudtest.TinyImage(t), "tiny", "256", "1")
}

// newCloudWithImage starts a cloud with a network of its own (created with
// netArgs added), the built image in dir imported as image, and a one-vCPU
// flavor.
func newCloudWithImage(t *testing.T, image, dir, flavor, memoryMiB, diskGiB string, netArgs ...string) *cloudtest.Cloud {
	t.Helper()
	c := cloudtest.Start(t)
	c.WaitHostUp()
	// A CIDR of its own, so that tests and a `make up` cloud on the same
	// machine never share a bridge.
	cidr := fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(50), rand.IntN(250))
	c.MustMC(append([]string{"network", "create", "default", "--cidr", cidr}, netArgs...)...)
	c.MustMC("flavor", "create", flavor, "--vcpus", "1", "--memory-mib", memoryMiB, "--disk-gib", diskGiB)
	importImage(t, c, image, dir)
	return c
}

// importImage imports the built image in dir (disk, kernel, initrd,
// cmdline) as image.
func importImage(t *testing.T, c *cloudtest.Cloud, image, dir string) {
	t.Helper()
	c.ImportImage(image, dir)
}

// waitVM follows WatchVMs until cond holds for the VM, and returns it.
func waitVM(t *testing.T, c *cloudtest.Cloud, name string, what string, cond func(*minicloudv1.VM) bool) *minicloudv1.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	req := &minicloudv1.WatchVMsRequest{Name: name}
	if what == "deleted" {
		// Watch from a list's version: a VM already gone is not in the
		// list, and one deleted after it shows up as DELETED.
		list, err := c.Client.VMs.ListVMs(ctx, &minicloudv1.ListVMsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, vm := range list.GetVms() {
			found = found || vm.GetMeta().GetName() == name
		}
		if !found {
			return nil
		}
		req.ResourceVersion = list.GetResourceVersion()
	}
	stream, err := c.Client.VMs.WatchVMs(ctx, req)
	if err != nil {
		t.Fatalf("watch %s: %v", name, err)
	}
	var last *minicloudv1.VM
	for {
		ev, err := stream.Recv()
		if err != nil {
			t.Fatalf("VM %s: waiting for %s: %v\nlast seen: %v\nlog:\n%s", name, what, err, last, c.Log())
		}
		if ev.GetType() == minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED {
			if what == "deleted" {
				return ev.GetVm()
			}
			t.Fatalf("VM %s deleted while waiting for %s", name, what)
		}
		if ev.GetVm() == nil {
			continue
		}
		last = ev.GetVm()
		if cond != nil && cond(last) {
			return last
		}
		if last.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_ERROR && what != "error" {
			t.Fatalf("VM %s went to ERROR while waiting for %s: %s: %s\nlog:\n%s", name, what,
				last.GetStatus().GetReason(), last.GetStatus().GetMessage(), c.Log())
		}
	}
}

func phaseIs(p minicloudv1.VMPhase) func(*minicloudv1.VM) bool {
	return func(vm *minicloudv1.VM) bool { return vm.GetStatus().GetPhase() == p }
}

func condition(vm *minicloudv1.VM, typ string) bool {
	for _, c := range vm.GetStatus().GetConditions() {
		if c.GetType() == typ {
			return c.GetStatus()
		}
	}
	return false
}

// consoleShows waits for the serial console to contain want.
func consoleShows(t *testing.T, c *cloudtest.Cloud, name, want string) string {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	var log string
	for time.Now().Before(deadline) {
		resp, err := c.Client.VMs.GetConsoleLog(context.Background(), &minicloudv1.GetConsoleLogRequest{Name: name, TailBytes: 1 << 20})
		if err != nil {
			t.Fatalf("console log of %s: %v", name, err)
		}
		log = string(resp.GetData())
		if strings.Contains(log, want) {
			return log
		}
		time.Sleep(500 * time.Millisecond) // console output has no event stream
	}
	t.Fatalf("console of %s never showed %q; it shows:\n%s", name, want, log)
	return ""
}

// virsh runs virsh against the system libvirt.
func virsh(args ...string) (string, error) {
	out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput()
	return string(out), err
}

// assertNothingLeft checks libvirt, the kernel's links, the agent's files and
// etcd for anything left of a deleted VM.
func assertNothingLeft(t *testing.T, c *cloudtest.Cloud, id string) {
	t.Helper()
	if out, err := virsh("dominfo", "mc-"+id); err == nil {
		t.Errorf("domain mc-%s still exists:\n%s", id, out)
	}
	tap := nic.TapNamePrefix(id)
	out, err := exec.Command("ip", "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link: %v", err)
	}
	if strings.Contains(string(out), tap) {
		t.Errorf("tap %s* still exists:\n%s", tap, out)
	}
	if _, err := os.Stat(filepath.Join(c.DataDir, "agent", "vms", id)); !os.IsNotExist(err) {
		t.Errorf("VM directory of %s still exists (err %v)", id, err)
	}
	resp, err := c.Etcd.Get(context.Background(), store.Prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if strings.Contains(k, id) || string(kv.Value) == id {
			// Events stay as history; a request-id key expires with its
			// 24 h lease.
			if strings.HasPrefix(k, store.VMEventPrefix) || strings.HasPrefix(k, store.VMRequestPrefix) {
				continue
			}
			t.Errorf("etcd still holds %s for deleted VM %s", k, id)
		}
	}
}

func TestVMLifecycleOnRealLibvirt(t *testing.T) {
	c := newTinyCloud(t)
	userData := filepath.Join(c.DataDir, "user-data")
	if err := os.WriteFile(userData, []byte("#cloud-config\nhostname: web1\n# e2e-user-data-marker\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.MustMC("vm", "create", "web1", "--image", "tiny", "--flavor", "tiny", "--user-data", userData)

	vm := waitVM(t, c, "web1", "running", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	id := vm.GetMeta().GetId()
	for _, cond := range []string{"Scheduled", "DiskReady", "NetworkReady", "DomainRunning"} {
		if !condition(vm, cond) {
			t.Errorf("RUNNING VM lacks condition %s: %v", cond, vm.GetStatus().GetConditions())
		}
	}
	if got := vm.GetStatus().GetHypervisor(); got != "kvm" && got != "tcg" {
		t.Errorf("status.hypervisor = %q", got)
	}
	if out, err := virsh("domstate", "mc-"+id); err != nil || !strings.Contains(out, "running") {
		t.Fatalf("libvirt says domain mc-%s is %q (%v)", id, out, err)
	}
	// The disk is an overlay over the cached image, never a copy.
	out, err := exec.Command("qemu-img", "info", "-f", "qcow2", "-U", filepath.Join(c.DataDir, "agent", "vms", id, "disk.qcow2")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "backing file:") {
		t.Errorf("VM disk is not an overlay: %v\n%s", err, out)
	}

	// The guest got its address by DHCP and read its own metadata.
	waitVM(t, c, "web1", "guest ready", func(vm *minicloudv1.VM) bool { return condition(vm, "GuestReady") })
	log := consoleShows(t, c, "web1", "MINICLOUD-GUEST-READY instance-id="+id)
	if !strings.Contains(log, "e2e-user-data-marker") {
		t.Errorf("the guest did not print its user-data; console:\n%s", log)
	}
	if ip := vm.GetStatus().GetAddresses()[0].GetIp(); !strings.Contains(log, "local-ipv4="+ip) {
		t.Errorf("the guest does not report its address %s; console:\n%s", ip, log)
	}

	// Stop: ACPI shutdown, domain shut off, VM STOPPED.
	c.MustMC("vm", "stop", "web1")
	waitVM(t, c, "web1", "stopped", phaseIs(minicloudv1.VMPhase_VM_PHASE_STOPPED))
	if out, _ := virsh("domstate", "mc-"+id); !strings.Contains(out, "shut off") {
		t.Errorf("after stop libvirt says %q", out)
	}
	// Start again, then reboot.
	c.MustMC("vm", "start", "web1")
	waitVM(t, c, "web1", "running again", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	c.MustMC("vm", "reboot", "web1")
	waitVM(t, c, "web1", "rebooted", func(vm *minicloudv1.VM) bool {
		return vm.GetSpec().GetRebootGeneration() > 0 &&
			vm.GetStatus().GetObservedRebootGeneration() == vm.GetSpec().GetRebootGeneration() &&
			vm.GetStatus().GetPhase() == minicloudv1.VMPhase_VM_PHASE_RUNNING
	})

	// Events tell the story.
	events := c.MustMC("vm", "events", "web1")
	for _, want := range []string{"Scheduled", "Started", "Stopped", "Rebooted"} {
		if !strings.Contains(events, want) {
			t.Errorf("vm events lacks %s:\n%s", want, events)
		}
	}

	c.MustMC("vm", "delete", "web1")
	waitVM(t, c, "web1", "deleted", nil)
	assertNothingLeft(t, c, id)
	// The network's bridge goes with its last VM on this host.
	bridge := vm.GetStatus().GetAddresses()[0].GetBridge()
	if out, err := exec.Command("ip", "link", "show", bridge).CombinedOutput(); err == nil {
		t.Errorf("bridge %s still exists after its last VM was deleted:\n%s", bridge, out)
	}
}

// TestAgentCrashDuringCreateAndDelete kills the whole all-in-one with
// SIGKILL in the middle of a create and of a delete, starts it again on the
// same state, and checks that it converges: one domain, then nothing left.
func TestAgentCrashDuringCreateAndDelete(t *testing.T) {
	c := newTinyCloud(t)
	c.MustMC("vm", "create", "crashy", "--image", "tiny", "--flavor", "tiny")
	vm := waitVM(t, c, "crashy", "scheduled", func(vm *minicloudv1.VM) bool { return vm.GetStatus().GetHost() != "" })
	id := vm.GetMeta().GetId()
	// Mid-create: the agent has begun (the VM's directory is the first
	// thing it makes). The phase cannot tell: a create that ends within
	// the agent's CREATING report delay stays SCHEDULED until RUNNING.
	dir := filepath.Join(c.DataDir, "agent", "vms", id)
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(dir); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not begin the create of %s within a minute", id)
		}
	}
	c.Kill()
	c.Run()
	vm = waitVM(t, c, "crashy", "running after restart", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	out, err := virsh("list", "--all", "--name")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out, "mc-"+id); n != 1 {
		t.Fatalf("%d domains for VM %s after the crash, want 1:\n%s", n, id, out)
	}

	c.MustMC("vm", "delete", "crashy")
	waitVM(t, c, "crashy", "deleting", phaseIs(minicloudv1.VMPhase_VM_PHASE_DELETING))
	c.Kill()
	c.Run()
	waitVM(t, c, "crashy", "deleted", nil)
	assertNothingLeft(t, c, id)
}

// TestCorruptImageGoesToError tampers with an image blob on the API side
// after upload: the host's digest check refuses it, and the VM goes to
// ERROR with a reason the user can read, leaving nothing behind.
func TestCorruptImageGoesToError(t *testing.T) {
	c := newTinyCloud(t)
	img, err := c.Client.Images.GetImage(context.Background(), &minicloudv1.GetImageRequest{Name: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(c.DataDir, "images", img.GetDisk().GetSha256())
	// Same size, other bytes: only the host's digest check can notice.
	data, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	for i := range data[:min(len(data), 4096)] {
		data[i] ^= 0xff
	}
	if err := os.WriteFile(blob, data, 0o644); err != nil {
		t.Fatalf("tamper with %s: %v", blob, err)
	}
	c.MustMC("vm", "create", "bad", "--image", "tiny", "--flavor", "tiny")
	vm := waitVM(t, c, "bad", "error", phaseIs(minicloudv1.VMPhase_VM_PHASE_ERROR))
	if vm.GetStatus().GetReason() != "ImageUnusable" || !strings.Contains(vm.GetStatus().GetMessage(), "sha256") {
		t.Errorf("ERROR reason %q message %q; want ImageUnusable naming the sha256", vm.GetStatus().GetReason(), vm.GetStatus().GetMessage())
	}
	show := c.MustMC("vm", "show", "bad")
	if !strings.Contains(show, "ImageUnusable") {
		t.Errorf("vm show does not tell why:\n%s", show)
	}
	id := vm.GetMeta().GetId()
	if _, err := virsh("dominfo", "mc-"+id); err == nil {
		t.Errorf("a domain was defined for a VM whose image is corrupt")
	}
	c.MustMC("vm", "delete", "bad")
	waitVM(t, c, "bad", "deleted", nil)
	assertNothingLeft(t, c, id)
}

// TestVanishedDomainIsReported removes a running VM's domain behind the
// agent's back: the VM is reported in ERROR (DomainMissing), not silently
// recreated, and can still be deleted cleanly.
func TestVanishedDomainIsReported(t *testing.T) {
	c := newTinyCloud(t)
	c.MustMC("vm", "create", "gone", "--image", "tiny", "--flavor", "tiny")
	vm := waitVM(t, c, "gone", "running", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	id := vm.GetMeta().GetId()
	if out, err := virsh("destroy", "mc-"+id); err != nil {
		t.Fatalf("virsh destroy: %v\n%s", err, out)
	}
	if out, err := virsh("undefine", "mc-"+id); err != nil {
		t.Fatalf("virsh undefine: %v\n%s", err, out)
	}
	vm = waitVM(t, c, "gone", "error", phaseIs(minicloudv1.VMPhase_VM_PHASE_ERROR))
	if vm.GetStatus().GetReason() != "DomainMissing" {
		t.Errorf("reason %q, want DomainMissing", vm.GetStatus().GetReason())
	}
	if _, err := virsh("dominfo", "mc-"+id); err == nil {
		t.Errorf("the agent recreated the vanished domain")
	}
	c.MustMC("vm", "delete", "gone")
	waitVM(t, c, "gone", "deleted", nil)
	assertNothingLeft(t, c, id)
}
