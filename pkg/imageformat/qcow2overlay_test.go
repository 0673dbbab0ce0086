package imageformat_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/pkg/imageformat"
)

// writeOverlay makes path an overlay with the Go writer, as agent/disk does.
func writeOverlay(t *testing.T, path, backing string, format imageformat.Format, size int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := imageformat.WriteQCOW2Overlay(f, backing, format, size)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(n); err != nil {
		t.Fatal(err)
	}
}

func qemuImg(t *testing.T, args ...string) []byte {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// TestQCOW2OverlayMatchesQemuImg writes overlays in Go and with `qemu-img
// create` side by side, over a raw and a qcow2 backing file and at sizes
// whose L1 table needs one entry, a few, and more than one cluster: QEMU's
// own checker must find the Go file clean, `qemu-img info` must report the
// same format, virtual size, backing file and backing format for both, and
// the metadata (header fields, refcount table and block, file length) must
// be the bytes qemu-img wrote.
func TestQCOW2OverlayMatchesQemuImg(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img missing: run hack/setup-host.sh")
	}
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(raw, bytes.Repeat([]byte{0x5a}, 3<<20+100), 0o600); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", q, "64M")

	for _, c := range []struct {
		name    string
		backing string
		format  imageformat.Format
		size    int64
	}{
		{"raw backing, its odd size", raw, imageformat.Raw, 3<<20 + 100},
		{"raw backing, 1 GiB", raw, imageformat.Raw, 1 << 30},
		{"qcow2 backing, 20 GiB", q, imageformat.QCOW2, 20 << 30},
		{"qcow2 backing, 5 TiB (L1 over two clusters)", q, imageformat.QCOW2, 5 << 40},
	} {
		t.Run(c.name, func(t *testing.T) {
			sub := t.TempDir()
			goPath, qemuPath := filepath.Join(sub, "go.qcow2"), filepath.Join(sub, "qemu.qcow2")
			writeOverlay(t, goPath, c.backing, c.format, c.size)
			qemuImg(t, "create", "-q", "-f", "qcow2", "-F", string(c.format), "-b", c.backing, qemuPath, strconvI(c.size))

			qemuImg(t, "check", "-f", "qcow2", goPath)
			gi, qi := info(t, goPath), info(t, qemuPath)
			for _, k := range []string{"format", "virtual-size", "backing-filename", "full-backing-filename", "backing-filename-format", "cluster-size"} {
				if gi[k] != qi[k] || gi[k] == nil {
					t.Errorf("qemu-img info %s: Go overlay %v, qemu-img's %v", k, gi[k], qi[k])
				}
			}
			gs, qs := specific(gi), specific(qi)
			for _, k := range []string{"compat", "refcount-bits", "corrupt", "extended-l2", "compression-type", "lazy-refcounts"} {
				if gs[k] != qs[k] {
					t.Errorf("qemu-img info format-specific %s: Go overlay %v, qemu-img's %v", k, gs[k], qs[k])
				}
			}

			gb, err := os.ReadFile(goPath)
			if err != nil {
				t.Fatal(err)
			}
			qb, err := os.ReadFile(qemuPath)
			if err != nil {
				t.Fatal(err)
			}
			if len(gb) != len(qb) {
				t.Errorf("file length: Go %d, qemu-img %d", len(gb), len(qb))
			}
			// The header proper (extensions differ: qemu-img adds a
			// feature name table, so the backing name sits elsewhere).
			const headerEnd = 112
			if g, w := withoutBackingOffset(gb[:headerEnd]), withoutBackingOffset(qb[:headerEnd]); !bytes.Equal(g, w) {
				t.Errorf("header differs from qemu-img's:\n go   %x\n qemu %x", g, w)
			}
			for _, cl := range []int{1, 2} { // refcount table, refcount block
				if !bytes.Equal(gb[cl<<16:(cl+1)<<16], qb[cl<<16:(cl+1)<<16]) {
					t.Errorf("cluster %d (refcounts) differs from qemu-img's", cl)
				}
			}
			if !bytes.Equal(gb[3<<16:], qb[3<<16:]) {
				t.Errorf("the L1 table differs from qemu-img's")
			}
			if st, err := os.Stat(goPath); err != nil || st.Mode().Perm() != 0o600 {
				t.Errorf("mode %v (%v), want 0600", st.Mode(), err)
			}
		})
	}
}

// withoutBackingOffset blanks bytes 8-15 (backing_file_offset).
func withoutBackingOffset(h []byte) []byte {
	c := bytes.Clone(h)
	copy(c[8:16], make([]byte, 8))
	return c
}

func info(t *testing.T, path string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(qemuImg(t, "info", "-f", "qcow2", "--output=json", "-U", path), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func specific(info map[string]any) map[string]any {
	fs, _ := info["format-specific"].(map[string]any)
	d, _ := fs["data"].(map[string]any)
	return d
}

func strconvI(n int64) string { return fmt.Sprint(n) }

// TestQCOW2OverlayRefusals: what QEMU could not open is refused before a
// byte is written.
func TestQCOW2OverlayRefusals(t *testing.T) {
	for _, c := range []struct {
		name    string
		backing string
		format  imageformat.Format
		size    int64
	}{
		{"vmdk backing", "/b", "vmdk", 1 << 30},
		{"no backing", "", imageformat.Raw, 1 << 30},
		{"backing name too long", "/" + strings.Repeat("a", 1023), imageformat.Raw, 1 << 30},
		{"zero size", "/b", imageformat.Raw, 0},
		{"beyond QEMU's L1 limit", "/b", imageformat.Raw, 1 << 62},
	} {
		var w recorder
		if _, err := imageformat.WriteQCOW2Overlay(&w, c.backing, c.format, c.size); err == nil {
			t.Errorf("%s: accepted", c.name)
		}
		if w.writes != 0 {
			t.Errorf("%s: %d writes before refusing", c.name, w.writes)
		}
	}
}

type recorder struct{ writes int }

func (r *recorder) WriteAt(p []byte, off int64) (int, error) { r.writes++; return len(p), nil }
