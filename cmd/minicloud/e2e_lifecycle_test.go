package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	netlinux "github.com/minicloud/minicloud/agent/network/linux"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/nic"
)

// TestE2EVMLifecycle boots the tiny guest image on this machine through the
// whole stack: minicloudd all-in-one (API, scheduler, agent with libvirt,
// metadata) driven only by the CLI. It checks the phase stream of --wait,
// GuestReady, the console log, stop/start, and that delete --wait leaves no
// domain, tap or VM directory behind (looked up on the host, not in our
// records). Timeouts are generous: TCG guests on a loaded 2-core machine
// take minutes; the logged laps are what it took.
func TestE2EVMLifecycle(t *testing.T) {
	skipShort(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root (the agent creates bridges, taps and libvirt domains)")
	}
	if _, err := os.Stat("/var/run/libvirt/libvirt-sock"); err != nil {
		t.Skip("libvirtd is not running (hack/setup-host.sh installs and starts it)")
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		t.Skip("virsh not installed (libvirt-clients)")
	}
	images := cloudtest.TinyImage(t)
	cmdline, err := os.ReadFile(filepath.Join(images, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}

	var bridge string
	// Registered before the cloud starts, so it runs after the cloud has
	// stopped and nothing recreates the bridge. The agent removes bridges
	// only while it runs, so the test removes the one it made.
	t.Cleanup(func() {
		if bridge != "" {
			if err := netlinux.New().DeleteBridge(context.Background(), bridge); err != nil {
				t.Errorf("delete bridge %s: %v", bridge, err)
			}
			if _, err := net.InterfaceByName(bridge); err == nil {
				t.Errorf("bridge %s still exists", bridge)
			}
		}
	})
	c := startCloud(t)
	c.WaitHostUp()

	// A subnet of its own, so it cannot clash with `make up`'s network.
	octet, _ := rand.Int(rand.Reader, big.NewInt(200))
	cidr := fmt.Sprintf("10.231.%d.0/24", octet.Int64()+20)
	var nw struct{ Bridge string }
	decodeJSON(t, c.ok("network", "create", "default", "--cidr", cidr, "-o", "json"), &nw)
	bridge = nw.Bridge
	c.ok("flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	c.ok("image", "create", "tiny", "--file", filepath.Join(images, "disk.qcow2"),
		"--kernel", filepath.Join(images, "vmlinuz"), "--initrd", filepath.Join(images, "initrd.img"),
		"--cmdline", strings.TrimSpace(string(cmdline)))

	// Whatever happens below, no VM outlives the test.
	t.Cleanup(func() {
		var list struct {
			Vms []struct{ Meta struct{ Name string } }
		}
		if err := jsonOf(c.mc("vm", "list", "-o", "json"), &list); err != nil {
			t.Errorf("list VMs for cleanup: %v", err)
			return
		}
		for _, vm := range list.Vms {
			if r := c.mc("vm", "delete", vm.Meta.Name, "--wait", "--timeout", "5m"); r.code != 0 {
				t.Errorf("cleanup: delete vm %s: %s", vm.Meta.Name, r.stderr)
			}
		}
	})

	step := time.Now()
	lap := func(what string) {
		t.Logf("%-28s %s", what, time.Since(step).Round(10*time.Millisecond))
		step = time.Now()
	}
	r := c.mcIn("#cloud-config\nhostname: demo\n", "vm", "create", "demo", "--image", "tiny", "--flavor", "tiny",
		"--user-data", "-", "--wait", "--timeout", "10m", "-o", "json")
	if r.code != 0 {
		t.Fatalf("vm create --wait: exit %d\nstderr: %s\nlog:\n%s", r.code, r.stderr, c.Log())
	}
	// --wait printed the phases as they happened, ending in RUNNING.
	if !strings.Contains(r.stderr, "vm demo: PENDING") || !strings.HasSuffix(strings.TrimSpace(r.stderr), "vm demo: RUNNING") {
		t.Fatalf("vm create --wait phase lines:\n%s", r.stderr)
	}
	var vm struct {
		Meta   struct{ Id string }
		Status struct {
			Phase, Host string
			Addresses   []struct{ Ip string }
		}
	}
	lap("create --wait (RUNNING)")
	decodeJSON(t, r.stdout, &vm)
	if vm.Status.Phase != "VM_PHASE_RUNNING" || vm.Status.Host == "" || len(vm.Status.Addresses) == 0 {
		t.Fatalf("vm after --wait: %+v", vm)
	}
	id := vm.Meta.Id
	domain := "mc-" + id
	tap := nic.TapName(id, 0)
	if !domainExists(t, domain) {
		t.Fatalf("RUNNING but libvirt has no domain %s", domain)
	}
	if _, err := net.InterfaceByName(tap); err != nil {
		t.Fatalf("RUNNING but no tap %s: %v", tap, err)
	}

	c.ok("vm", "wait", "demo", "--for", "ready", "--timeout", "10m")
	lap("then GuestReady")
	if out := c.ok("vm", "console-log", "demo"); len(out) == 0 {
		t.Fatal("empty console log of a ready guest")
	}
	if out := c.ok("vm", "events", "demo"); strings.Count(out, "\n") < 2 {
		t.Fatalf("vm events:\n%s", out)
	}
	if out := c.ok("vm", "list"); !strings.Contains(out, vm.Status.Addresses[0].Ip) || !strings.Contains(out, "RUNNING") {
		t.Fatalf("vm list:\n%s", out)
	}

	c.ok("vm", "stop", "demo")
	c.ok("vm", "wait", "demo", "--for", "stopped", "--timeout", "5m")
	lap("stop (STOPPED)")
	c.ok("vm", "start", "demo")
	c.ok("vm", "wait", "demo", "--for", "running", "--timeout", "5m")
	lap("start (RUNNING)")

	if out := c.ok("vm", "delete", "demo", "--wait", "--timeout", "5m"); !strings.Contains(out, "deleted") {
		t.Fatalf("vm delete --wait printed %q", out)
	}
	lap("delete --wait (gone)")
	if domainExists(t, domain) {
		t.Errorf("domain %s left behind", domain)
	}
	if _, err := net.InterfaceByName(tap); err == nil {
		t.Errorf("tap %s left behind", tap)
	}
	if _, err := os.Stat(filepath.Join(c.DataDir, "agent", "vms", id)); !os.IsNotExist(err) {
		t.Errorf("VM directory left behind: %v", err)
	}
}

func domainExists(t *testing.T, name string) bool {
	t.Helper()
	out, err := exec.Command("virsh", "-c", "qemu:///system", "list", "--all", "--name").CombinedOutput()
	if err != nil {
		t.Fatalf("virsh list: %v\n%s", err, out)
	}
	for _, l := range strings.Fields(string(out)) {
		if l == name {
			return true
		}
	}
	return false
}

func jsonOf(r result, v any) error {
	if r.code != 0 {
		return fmt.Errorf("exit %d: %s", r.code, r.stderr)
	}
	return json.Unmarshal([]byte(r.stdout), v)
}
