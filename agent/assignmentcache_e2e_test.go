package agent_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestGuestServicesOutliveTheAPI: the control plane dies with the host's
// agent, the agent comes back alone while the API stays down, and a real
// guest that reboots then still gets its DHCP lease and its metadata —
// served from the assignments the agent saved — while its domain is left
// alone. Then the API comes back with an etcd that no longer knows the VM
// (a restored backup): the live list, empty, stops the domain and the disk
// goes to the trash, intact.
func TestGuestServicesOutliveTheAPI(t *testing.T) {
	c := newTinyCloud(t)
	c.MustMC("vm", "create", "keeper", "--image", "tiny", "--flavor", "tiny")
	vm := waitVM(t, c, "keeper", "running", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	id := vm.GetMeta().GetId()
	ip := vm.GetStatus().GetAddresses()[0].GetIp()
	consoleShows(t, c, "keeper", "MINICLOUD-GUEST-READY instance-id="+id)
	domID, err := virsh("domid", "mc-"+id)
	if err != nil {
		t.Fatal(err)
	}
	saved := filepath.Join(c.DataDir, "agent", "assignments.json")
	waitFileHas(t, saved, id)

	// API, scheduler and agent die together; the API stays down.
	c.Kill()
	agentProc := cloudtest.StartProc(t, "agent", c.Daemon, "agent", "--data-dir", c.DataDir, "--api", c.Endpoint,
		"--agent-listen", "127.0.0.1:0", "--agent-metrics-listen", "")
	waitLog(t, agentProc, "serving guests from the saved assignments")

	// The guest reboots (a hard reset: same QEMU, same console file) and
	// asks for a lease and its metadata again.
	console := filepath.Join(c.DataDir, "agent", "vms", id, "console.log")
	before := readFile(t, console)
	if out, err := virsh("reset", "mc-"+id); err != nil {
		t.Fatalf("virsh reset: %v\n%s", err, out)
	}
	lease := regexp.MustCompile(`MINICLOUD-DHCP bound ip=` + regexp.QuoteMeta(ip) + `/`)
	ready := "MINICLOUD-GUEST-READY instance-id=" + id
	var after string
	for deadline := time.Now().Add(4 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		after = strings.TrimPrefix(readFile(t, console), before)
		if strings.Contains(after, "MINICLOUD-TINY-INIT") && lease.MatchString(after) && strings.Contains(after, ready) {
			break
		}
		if strings.Contains(after, "MINICLOUD-GUEST-ERROR") || time.Now().After(deadline) {
			t.Fatalf("after a reboot with the API down the guest got no lease or no metadata; console since the reset:\n%s\nagent log:\n%s", after, agentProc.Log())
		}
	}
	t.Logf("rebooted guest with the API down: lease %s and metadata from the saved assignments", ip)
	if now, err := virsh("domid", "mc-"+id); err != nil || now != domID {
		t.Fatalf("domain id %q, was %q (%v): the agent acted on the domain without the API", now, domID, err)
	}

	// The API comes back from a backup older than the VM: it answers an
	// empty assignment list.
	agentProc.Kill()
	if _, err := c.Etcd.Delete(context.Background(), store.Prefix+"vms/", clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	c.Run()
	c.WaitHostUp()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		if _, err := virsh("dominfo", "mc-"+id); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the domain of a VM the API no longer lists still runs\nlog:\n%s", c.Log())
		}
	}
	// The domain goes first; its files move to the trash once its ports
	// are gone too.
	var kept []string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		kept, _ = filepath.Glob(filepath.Join(c.DataDir, "agent", "trash", id+".*", "disk.qcow2"))
		if len(kept) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the disk of a VM the API no longer lists is not in the trash: %v\nlog:\n%s", kept, c.Log())
		}
	}
	if fi, err := os.Stat(kept[0]); err != nil || fi.Size() == 0 {
		t.Fatalf("trashed disk: %v %v", fi, err)
	}
	for deadline := time.Now().Add(30 * time.Second); strings.Contains(readFile(t, saved), id); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the saved assignments still list the VM after the live list dropped it")
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func waitFileHas(t *testing.T, path, want string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			b, err := os.ReadFile(path)
			t.Fatalf("%s does not name %s: %q %v", path, want, b, err)
		}
	}
}

func waitLog(t *testing.T, p *cloudtest.Proc, want string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); !strings.Contains(p.Log(), want); time.Sleep(100 * time.Millisecond) {
		if p.Exited() || time.Now().After(deadline) {
			t.Fatalf("%s did not log %q:\n%s", p.Name, want, p.Log())
		}
	}
}
