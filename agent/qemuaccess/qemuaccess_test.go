package qemuaccess

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestDetect(t *testing.T) {
	dir := t.TempDir()
	conf := func(body string) string {
		p := filepath.Join(dir, "qemu.conf")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if a, err := Detect(filepath.Join(dir, "absent.conf")); err != nil || a != (Access{}) {
		t.Errorf("no libvirt: %v %v, want root only", a, err)
	}
	a, err := Detect(conf("#group = \"libvirt-qemu\"\nuser = \"+4321\"\ngroup = \"+1234\"\n"))
	if gid, ok := a.GID(); err != nil || !ok || gid != 1234 {
		t.Errorf("group +1234: %v %v", a, err)
	}
	if _, err := Detect(conf("group = \"no-such-group-mc\"\n")); err == nil {
		t.Error("an unknown group was accepted")
	}
}

func TestModes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to another group")
	}
	dir := t.TempDir()
	a := ForGroup(4242)
	d := filepath.Join(dir, "a", "b")
	if err := a.MkdirAll(d); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(d, "image")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.ShareFile(f); err != nil {
		t.Fatal(err)
	}
	check := func(p string, mode os.FileMode) {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode || fi.Sys().(*syscall.Stat_t).Gid != 4242 {
			t.Errorf("%s: mode %v gid %d, want %v gid 4242", p, fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid, mode)
		}
	}
	check(d, 0o710)
	check(f, 0o640)
	// An existing directory with a wider mode is tightened.
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := a.MkdirAll(d); err != nil {
		t.Fatal(err)
	}
	check(d, 0o710)
	// The parents are created private, not opened to QEMU.
	if fi, _ := os.Stat(filepath.Join(dir, "a")); fi.Mode().Perm() != 0o700 {
		t.Errorf("parent mode %v, want 0700", fi.Mode().Perm())
	}
}
