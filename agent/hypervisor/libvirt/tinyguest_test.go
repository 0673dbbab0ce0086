package libvirt_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/metadata"
	"github.com/minicloud/minicloud/metadata/configdrive"
)

// TestTinyGuestReadsConfigDrive boots the tiny image with an OpenStack
// config drive built by metadata/configdrive and waits for the guest to
// print what it read from it: the cdrom wiring (IDE, read-only), the
// initramfs modules (ata_piix, sr_mod, isofs) and the label lookup all work.
func TestTinyGuestReadsConfigDrive(t *testing.T) {
	requireLibvirt(t)
	if testing.Short() {
		t.Skip("-short: boots a guest under QEMU")
	}
	d := newDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute) // TCG on a loaded host
	defer cancel()
	spec := newSpec(t, uuid.NewString())
	spec.ConfigDrivePath = filepath.Join(filepath.Dir(spec.DiskPath), "config.iso")
	inst := &metadata.Instance{ID: spec.VMID, Name: "cd-test", Hostname: "cd-test", Project: "default",
		UserData: []byte("#cloud-config\nhostname: from-config-drive\n")}
	if err := configdrive.WriteFile(spec.ConfigDrivePath, inst, configdrive.ConfigDrive2); err != nil {
		t.Fatal(err)
	}
	if err := d.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	t.Cleanup(func() { _ = d.Undefine(context.Background(), spec.VMID) })
	if err := d.Start(ctx, spec.VMID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	want := []byte("MINICLOUD-CONFIGDRIVE-READY instance-id=" + spec.VMID)
	var log []byte
	for ctx.Err() == nil {
		var err error
		if log, err = hypervisor.ReadConsoleTail(spec.ConsoleLogPath, 1<<20); err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(log, want) {
			if !bytes.Contains(log, []byte("hostname: from-config-drive")) {
				t.Errorf("guest did not print the user-data from the config drive:\n%s", log)
			}
			return
		}
		// The console is a file the hypervisor appends to: poll it.
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("guest never printed %q; console:\n%s", want, log)
}
