package hypervisortest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/nic"
)

// TestFakeConformance holds the fake the reconcile loop's unit tests use to
// the same contract as the libvirt driver. The fake runs no guest, so the
// console and graceful-shutdown checks (which need markers) are skipped.
func TestFakeConformance(t *testing.T) {
	host := NewFakeHost()
	RunConformance(t, func(t *testing.T) hypervisor.Driver {
		d := NewFakeDriver(host)
		t.Cleanup(func() { _ = d.Close() })
		return d
	}, Fixtures{
		NewSpec: func(t *testing.T, vmID string) hypervisor.DomainSpec {
			dir := t.TempDir()
			disk := filepath.Join(dir, "disk.qcow2")
			if err := os.WriteFile(disk, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return hypervisor.DomainSpec{
				VMID: vmID, Name: "fake", Project: "p", VCPUs: 1, MemoryMiB: 128, Hypervisor: hypervisor.TCG,
				DiskPath: disk, DiskFormat: "qcow2", ConsoleLogPath: filepath.Join(dir, "console.log"),
				NICs: []nic.NIC{{MAC: []byte{0x52, 0x54, 0, 0, 0, 1}, TapName: nic.TapName(vmID, 0), MTU: 1500}},
			}
		},
		Observe: func(t *testing.T, vmID string) bool { return host.HasDomain(hypervisor.DomainName(vmID)) },
		DefineForeign: func(t *testing.T, name string) {
			host.DefineForeign(name)
			t.Cleanup(func() { host.RemoveDomain(name) })
		},
	})
}
