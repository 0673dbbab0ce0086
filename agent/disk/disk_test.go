package disk_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/agent/disk"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

func requireQemuImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img missing: run hack/setup-host.sh")
	}
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
	return string(out)
}

// base makes a 64 MiB qcow2 image with 4 MiB of data written into it, so a
// copy would be easy to tell from an overlay.
func base(t *testing.T, dir string) string {
	t.Helper()
	raw := filepath.Join(dir, "base.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(strings.Repeat("minicloud", 4<<20/9)), 1<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	p := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "convert", "-O", "qcow2", raw, p)
	return p
}

func TestCreateOverlayIsAnOverlayNotACopy(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	backing := base(t, dir)
	path := filepath.Join(dir, "vm", "disk.qcow2")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := disk.CreateOverlay(ctx, path, backing, "qcow2", 1<<30); err != nil {
		t.Fatalf("CreateOverlay: %v", err)
	}
	// A VM's disk is its owner's data: qemu-img's 0644 is tightened.
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("overlay mode: %v %v, want 0600", st.Mode().Perm(), err)
	}
	// Ask qemu-img itself, not our own Inspect.
	info := qemuImg(t, "info", "-U", path)
	if !strings.Contains(info, "backing file: "+backing) || !strings.Contains(info, "virtual size: 1 GiB") {
		t.Fatalf("qemu-img info of the overlay:\n%s", info)
	}
	st, _ := os.Stat(path)
	bst, _ := os.Stat(backing)
	if st.Size() >= bst.Size() || st.Size() > 1<<20 {
		t.Errorf("overlay is %d bytes, backing %d: looks like a copy", st.Size(), bst.Size())
	}
	// The guest sees the backing file's data through the overlay.
	out := filepath.Join(dir, "check.raw")
	qemuImg(t, "convert", "-O", "raw", path, out)
	b, _ := os.ReadFile(out)
	if !strings.Contains(string(b[1<<20:1<<20+90]), "minicloudminicloud") {
		t.Error("data of the backing image is not visible through the overlay")
	}

	// Idempotent: a second call leaves the existing overlay (and whatever
	// the guest wrote into it) alone.
	before, _ := os.ReadFile(path)
	if err := disk.CreateOverlay(ctx, path, backing, "qcow2", 1<<30); err != nil {
		t.Fatalf("second CreateOverlay: %v", err)
	}
	after, _ := os.ReadFile(path)
	if string(before) != string(after) {
		t.Error("second CreateOverlay rewrote the overlay")
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Error("temporary file left behind")
	}
	info2, err := disk.Inspect(ctx, path)
	if err != nil || info2.BackingFile != backing || info2.Format != "qcow2" || info2.BackingFormat != "qcow2" {
		t.Errorf("Inspect = %+v, %v", info2, err)
	}
}

func TestCreateOverlayRefusals(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	backing := base(t, dir)
	other := filepath.Join(dir, "other.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", other, "64M")
	// Hostile images: a qcow2 whose backing file is a host file, and one
	// with an external data file.
	chained := filepath.Join(dir, "chained.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", chained)
	external := filepath.Join(dir, "external.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), external, "16M")

	cases := []struct {
		name                string
		path, backing, fmt_ string
		size                int64
		want                func(error) bool
	}{
		{"relative path", "disk.qcow2", backing, "qcow2", 0, errdefs.IsInvalid},
		{"relative backing", filepath.Join(dir, "a.qcow2"), "base.qcow2", "qcow2", 0, errdefs.IsInvalid},
		{"wrong backing format", filepath.Join(dir, "b.qcow2"), backing, "raw", 0, errdefs.IsInvalid},
		{"unknown format", filepath.Join(dir, "c.qcow2"), backing, "vmdk", 0, errdefs.IsInvalid},
		{"smaller than image", filepath.Join(dir, "d.qcow2"), backing, "qcow2", 1 << 20, errdefs.IsInvalid},
		{"missing backing", filepath.Join(dir, "e.qcow2"), filepath.Join(dir, "nope.qcow2"), "qcow2", 0, errdefs.IsNotFound},
		{"other disk in the way", other, backing, "qcow2", 0, errdefs.IsConflict},
		{"image with a backing file", filepath.Join(dir, "f.qcow2"), chained, "qcow2", 0, errdefs.IsInvalid},
		{"image with a data file", filepath.Join(dir, "g.qcow2"), external, "qcow2", 0, errdefs.IsInvalid},
	}
	for _, c := range cases {
		err := disk.CreateOverlay(ctx, c.path, c.backing, c.fmt_, c.size)
		if !c.want(err) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// Nothing half-created by the refusals.
	list, err := disk.List(dir, ".qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 4 {
		t.Errorf("disks after refusals: %v, want only base, other, chained and external", list)
	}
}

func TestListAndRemove(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	backing := base(t, dir)
	vms := filepath.Join(dir, "vms")
	if err := os.MkdirAll(vms, 0o755); err != nil {
		t.Fatal(err)
	}
	a, b := filepath.Join(vms, "a.qcow2"), filepath.Join(vms, "b.qcow2")
	for _, p := range []string{a, b} {
		if err := disk.CreateOverlay(ctx, p, backing, "qcow2", 0); err != nil {
			t.Fatal(err)
		}
	}
	// A crash between qemu-img create and rename leaves a temporary.
	if err := os.WriteFile(b+".tmp", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	list, err := disk.List(vms, ".qcow2")
	if err != nil || len(list) != 3 {
		t.Fatalf("List = %v, %v; want a, b and b's temporary", list, err)
	}
	if err := disk.Remove(b); err != nil {
		t.Fatal(err)
	}
	if err := disk.Remove(b); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	list, _ = disk.List(vms, ".qcow2")
	if len(list) != 1 || list[0] != a {
		t.Errorf("after Remove: %v", list)
	}
	if l, err := disk.List(filepath.Join(dir, "absent"), ".qcow2"); err != nil || len(l) != 0 {
		t.Errorf("List of a missing dir = %v, %v", l, err)
	}
}

// TestCreateOverlayChecksAReplacedBackingFile: CreateOverlay remembers what
// it read of a backing file, but a file replaced at the same path (as a
// hostile image would be) is read and judged again.
func TestCreateOverlayChecksAReplacedBackingFile(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	backing := base(t, dir)
	if err := disk.CreateOverlay(ctx, filepath.Join(dir, "a.qcow2"), backing, "qcow2", 0); err != nil {
		t.Fatalf("CreateOverlay: %v", err)
	}
	chained := filepath.Join(dir, "chained.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", chained, "64M")
	if err := os.Rename(chained, backing); err != nil {
		t.Fatal(err)
	}
	if err := disk.CreateOverlay(ctx, filepath.Join(dir, "b.qcow2"), backing, "qcow2", 0); !errdefs.IsInvalid(err) {
		t.Fatalf("overlay over a replaced backing file that refers to /etc/passwd: %v, want Invalid", err)
	}
}
