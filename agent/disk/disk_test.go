package disk_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
	qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", raw, p)
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
	info := qemuImg(t, "info", "-f", "qcow2", "-U", path)
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
	qemuImg(t, "convert", "-f", "qcow2", "-O", "raw", path, out)
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
	info2, err := disk.Inspect(ctx, path, "qcow2")
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

// watchOpens reports whether anything opened path after the call.
func watchOpens(t *testing.T, path string) func() bool {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if _, err := syscall.InotifyAddWatch(fd, path, syscall.IN_OPEN); err != nil {
		t.Fatal(err)
	}
	return func() bool {
		buf := make([]byte, 4096)
		n, err := syscall.Read(fd, buf)
		return err == nil && n > 0
	}
}

// TestCreateOverlayNeverLetsQEMUGuess: a cached image recorded as raw (or
// qcow2) whose bytes are a VMDK descriptor naming a host file (issue 12).
// qemu-img left to guess reads it as VMDK and opens the named file, as the
// agent's user (root); CreateOverlay must refuse the image without any
// process opening that file.
func TestCreateOverlayNeverLetsQEMUGuess(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	secret := filepath.Join(dir, "host-secret")
	if err := os.WriteFile(secret, []byte(strings.Repeat("s", 4096)), 0o600); err != nil {
		t.Fatal(err)
	}
	descriptors := map[string]string{
		"bare version line (issue 12)": "version=1\nRW 8 FLAT \"" + secret + "\" 0\n",
		"full descriptor":              "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"" + secret + "\" 0\n",
	}
	i := 0
	for name, desc := range descriptors {
		for _, format := range []string{"raw", "qcow2"} {
			i++
			image := filepath.Join(dir, fmt.Sprintf("image-%d", i))
			if err := os.WriteFile(image, []byte(desc), 0o644); err != nil {
				t.Fatal(err)
			}
			opened := watchOpens(t, secret)
			err := disk.CreateOverlay(ctx, filepath.Join(dir, fmt.Sprintf("vm-%d.qcow2", i)), image, format, 1<<30)
			if opened() {
				t.Errorf("%s as %s: a process opened the host file the descriptor names (CreateOverlay: %v)", name, format, err)
			}
			if !errdefs.IsInvalid(err) {
				t.Errorf("%s as %s: CreateOverlay = %v, want Invalid", name, format, err)
			}
			t.Logf("%s as %s: %v", name, format, err)
		}
	}
	if list, _ := disk.List(dir, ".qcow2"); len(list) != 0 {
		t.Errorf("disks left by the refusals: %v", list)
	}

	// The same descriptor where the VM's disk should be: something else is
	// in the way, and it is not read as a VMDK to find out what.
	planted := filepath.Join(dir, "planted.qcow2")
	if err := os.WriteFile(planted, []byte(descriptors["full descriptor"]), 0o600); err != nil {
		t.Fatal(err)
	}
	opened := watchOpens(t, secret)
	err := disk.CreateOverlay(ctx, planted, base(t, dir), "qcow2", 0)
	if opened() {
		t.Errorf("a process opened the host file named by a descriptor at the disk's path (CreateOverlay: %v)", err)
	}
	if !errdefs.IsConflict(err) {
		t.Errorf("descriptor at the disk's path: CreateOverlay = %v, want Conflict", err)
	}
}

// TestCreateOverlayOverARawImage: a plain raw image gets an overlay that
// records the backing format, so QEMU never probes the image (or whatever
// the guest writes into its first sector).
func TestCreateOverlayOverARawImage(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	image := filepath.Join(dir, "image")
	if err := os.WriteFile(image, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "vm.qcow2")
	if err := disk.CreateOverlay(ctx, path, image, "raw", 1<<30); err != nil {
		t.Fatal(err)
	}
	info, err := disk.Inspect(ctx, path, "qcow2")
	if err != nil || info.BackingFile != image || info.BackingFormat != "raw" {
		t.Fatalf("Inspect = %+v, %v; want an overlay of %s recording format raw", info, err, image)
	}
	// An overlay at the path that records another backing format is not
	// the VM's disk: QEMU would read the image as that format.
	mislabelled := filepath.Join(dir, "mislabelled.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b", image, mislabelled, "1G")
	if err := disk.CreateOverlay(ctx, mislabelled, image, "raw", 1<<30); !errdefs.IsConflict(err) {
		t.Fatalf("overlay recording backing format qcow2 over a raw image: %v, want Conflict", err)
	}
	// Declared qcow2, the same bytes are refused.
	if err := disk.CreateOverlay(ctx, filepath.Join(dir, "other.qcow2"), image, "qcow2", 1<<30); !errdefs.IsInvalid(err) {
		t.Fatalf("raw image declared qcow2: %v, want Invalid", err)
	}
}

// TestExistingOverlayIsInspectedOncePerHeader: ensuring an existing
// overlay again (every reconcile pass) runs no qemu-img while its header
// is unchanged; a header rewritten in place (an unsafe rebase onto another
// backing file: same inode, same size) is read again and refused.
func TestExistingOverlayIsInspectedOncePerHeader(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	backing := base(t, dir)
	overlay := filepath.Join(dir, "vm.qcow2")
	for range 2 {
		if err := disk.CreateOverlay(ctx, overlay, backing, "qcow2", 0); err != nil {
			t.Fatalf("CreateOverlay: %v", err)
		}
	}
	before := disk.Inspections()
	for range 3 {
		if err := disk.CreateOverlay(ctx, overlay, backing, "qcow2", 0); err != nil {
			t.Fatalf("CreateOverlay of the existing overlay: %v", err)
		}
	}
	if n := disk.Inspections() - before; n != 0 {
		t.Fatalf("an unchanged overlay: %d qemu-img runs, want 0", n)
	}

	other := base(t, t.TempDir())
	qemuImg(t, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", other, overlay)
	if err := disk.CreateOverlay(ctx, overlay, backing, "qcow2", 0); !errdefs.IsConflict(err) {
		t.Fatalf("an overlay rebased onto %s behind the agent's back: %v, want Conflict", other, err)
	}
}

// TestOverlayMemoIsBounded: what the package remembers of overlays leaves
// with their VM directory and never exceeds its bound, however many disks
// come and go behind its back.
func TestOverlayMemoIsBounded(t *testing.T) {
	requireQemuImg(t)
	ctx := context.Background()
	dir := t.TempDir()
	backing := base(t, dir)
	vmDir := filepath.Join(dir, "vms", "a")
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(vmDir, "disk.qcow2")
	before := disk.Remembered()
	if err := disk.CreateOverlay(ctx, overlay, backing, "qcow2", 0); err != nil {
		t.Fatalf("CreateOverlay: %v", err)
	}
	if err := disk.CreateOverlay(ctx, overlay, backing, "qcow2", 0); err != nil {
		t.Fatalf("CreateOverlay again: %v", err)
	}
	if n := disk.Remembered(); n != before+1 {
		t.Fatalf("remembered %d overlays after checking one, want %d", n, before+1)
	}
	disk.ForgetUnder(filepath.Join(dir, "vms", "a"))
	if n := disk.Remembered(); n != before {
		t.Fatalf("remembered %d overlays after their directory was forgotten, want %d", n, before)
	}

	// More distinct disks than the bound: the memo stops at it.
	for i := range disk.MaxRemembered + 10 {
		disk.Remember(filepath.Join(vmDir, fmt.Sprintf("d%d.qcow2", i)))
	}
	if n := disk.Remembered(); n > disk.MaxRemembered {
		t.Fatalf("remembered %d overlays, bound %d", n, disk.MaxRemembered)
	}
	disk.ForgetUnder(vmDir)
	if n := disk.Remembered(); n != before {
		t.Fatalf("remembered %d overlays after their directory was forgotten, want %d", n, before)
	}
}
