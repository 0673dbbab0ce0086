package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/lab/invariants"
	"github.com/minicloud/minicloud/pkg/nic"
)

// auditSettle is how long the lab has to converge after a test before its
// invariants must hold: the longest recovery the lab tests cause (an agent
// cleaning up after a restart, a delete finishing) is well below it.
const auditSettle = 3 * time.Minute

// auditLab runs the invariant auditor (lab/invariants) on the lab at the
// end of a test: etcd against every host's libvirt, taps, VM directories
// and nftables port sets. deleted are the ids of VMs the test deleted,
// which must exist nowhere. Every violation left after auditSettle fails
// the test.
func auditLab(t *testing.T, l *lab.Lab, deleted ...string) {
	t.Helper()
	etcd, err := l.EtcdClient()
	if err != nil {
		t.Fatalf("audit: %v", err)
	}
	defer etcd.Close()
	ctx, cancel := context.WithTimeout(context.Background(), auditSettle+time.Minute)
	defer cancel()
	r, err := invariants.Audit(ctx, etcd, invariants.LabHosts{Lab: l}, invariants.Options{Deleted: deleted, Settle: auditSettle})
	if err != nil {
		t.Errorf("audit: %v", err)
	}
	if len(r.Violations) > 0 {
		t.Errorf("audit: %s", r)
		return
	}
	t.Logf("audit: %s", r)
}

// TestLabAuditorFindsLeftovers plants on a real host what a crashed agent
// could leave (a tap, a VM directory and a defined domain of no VM, and a
// filter element naming that tap) and wants the auditor to name each,
// through the lab's adapter; then removes them and wants the lab clean.
func TestLabAuditorFindsLeftovers(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	const ghost = "0badc0de-0000-4000-8000-000000000000"
	host := l.HostNames()[0]
	tap := nic.TapName(ghost, 0)
	dir := filepath.Join(l.AgentStateDir(host), "vms", ghost)
	xml := filepath.Join(t.TempDir(), "ghost.xml")
	domXML := `<domain type='qemu'><name>mc-` + ghost + `</name><memory unit='MiB'>16</memory>
<os><type arch='x86_64'>hvm</type></os></domain>`
	if err := os.WriteFile(xml, []byte(domXML), 0o644); err != nil {
		t.Fatal(err)
	}
	plant := [][]string{
		{"ip", "tuntap", "add", "dev", tap, "mode", "tap"},
		{"virsh", "define", xml},
		{"nft", "add", "element", "bridge", "minicloud", "port_mac", "{ " + tap + " . 52:54:00:de:ad:00 }"},
		// Last: the agent's periodic resync cleans up after a VM directory
		// of no VM (agent.observedVMIDs), and the audit must see it first.
		{"mkdir", "-p", dir},
	}
	remove := [][]string{
		{"nft", "delete", "element", "bridge", "minicloud", "port_mac", "{ " + tap + " . 52:54:00:de:ad:00 }"},
		{"virsh", "undefine", "mc-" + ghost},
		{"rm", "-rf", dir},
		{"ip", "link", "del", tap},
	}
	cleanup := func() {
		for _, argv := range remove {
			_, _ = l.Output(ctx, host, argv...)
		}
	}
	defer cleanup()
	for _, argv := range plant {
		if _, err := l.Output(ctx, host, argv...); err != nil {
			t.Fatal(err)
		}
	}

	etcd, err := l.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer etcd.Close()
	// One snapshot: the agent must not get to remove the planted things
	// first (it only removes what it made, but a leftover tap of its own
	// name pattern may be collected).
	r, err := invariants.Audit(ctx, etcd, invariants.LabHosts{Lab: l}, invariants.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"domain mc-" + ghost, "tap " + tap, "VM directory " + ghost, "port_mac element " + tap} {
		found := false
		for _, v := range r.Violations {
			found = found || (v.Invariant == invariants.Orphan && v.Where == host && strings.Contains(v.Detail, want))
		}
		if !found {
			t.Errorf("the auditor did not report %q on %s:\n%s", want, host, r)
		}
	}
	cleanup()
	auditLab(t, l)
}
