package imageformat

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minicloud/minicloud/pkg/imageformat/imageformattest"
)

// qemuVerdict is what qemu-img, left to guess the format, made of a file.
type qemuVerdict struct {
	opened      bool
	format      Format
	virtualSize int64
	backing     string
	dataFile    string
	errText     string // qemu-img's message when it could not open the file
}

// oracleDir makes a directory the unprivileged oracle can read: in
// $TMPDIR if nobody can reach it, else in /tmp.
func oracleDir(t testing.TB) string {
	t.Helper()
	base := os.TempDir()
	for d := base; d != filepath.Dir(d); d = filepath.Dir(d) {
		if st, err := os.Stat(d); err != nil || st.Mode().Perm()&0o001 == 0 {
			base = "/tmp"
			break
		}
	}
	dir, err := os.MkdirTemp(base, "imageformat-oracle-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// qemuImgInfo runs `qemu-img info --output=json` on data, written to a file
// in dir, with the given extra arguments (none: QEMU guesses the format).
//
// The oracle is fed hostile and fuzzed images that may name any file as a
// VMDK extent or qcow2 data file, so it runs with as little power as it
// can: as nobody when the test runs as root (no root-only device or file can
// be opened), read-only (qemu-img info), with a deadline (a FIFO or a
// terminal would block it), in dir, under a name that does not end in
// ".dmg" (QEMU's dmg driver claims files by name).
func qemuImgInfo(t testing.TB, dir string, data []byte, extra ...string) qemuVerdict {
	t.Helper()
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(img)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	args := append([]string{"info", "--output=json", "-U"}, extra...)
	cmd := exec.CommandContext(ctx, "qemu-img", append(args, "img")...)
	cmd.Dir = dir
	if os.Getuid() == 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			// It opened something that blocks (a FIFO a fuzzed extent
			// names): not raw, and the same driver, told, blocks too.
			return qemuVerdict{errText: "timed out"}
		}
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("qemu-img info: %v", err)
		}
		return qemuVerdict{errText: strings.TrimSpace(stderr.String())}
	}
	var raw struct {
		Format          string `json:"format"`
		VirtualSize     int64  `json:"virtual-size"`
		BackingFilename string `json:"backing-filename"`
		FormatSpecific  struct {
			Data struct {
				DataFile string `json:"data-file"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &raw); err != nil {
		t.Fatalf("parse qemu-img info: %v\n%s", err, stdout.String())
	}
	return qemuVerdict{opened: true, format: Format(raw.Format), virtualSize: raw.VirtualSize,
		backing: raw.BackingFilename, dataFile: raw.FormatSpecific.Data.DataFile}
}

func requireQemuImg(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
}

// agreeWithQemu checks QEMUProbe and Probe against qemu-img on data.
// QEMUProbe must name the driver qemu-img picks when it guesses. Probe may
// refuse anything, but what it accepts QEMU must read as the same format,
// with the same size and no other file. It returns Probe's verdict.
func agreeWithQemu(t testing.TB, dir string, data []byte) (Info, error) {
	t.Helper()
	q := qemuImgInfo(t, dir, data)
	// Raw opens any readable file, so a failure means QEMU picked another
	// driver, which, told the format, fails the same way.
	sameFailure := func(f Format) bool {
		forced := qemuImgInfo(t, dir, data, "-f", string(f))
		return !forced.opened && forced.errText == q.errText
	}
	switch claims := QEMUProbe(data); {
	case len(claims) == 0:
		if !q.opened || q.format != Raw {
			t.Fatalf("QEMUProbe: raw; qemu-img, guessing: %+v", q)
		}
	case len(claims) == 1:
		if q.opened && q.format != claims[0] || !q.opened && !sameFailure(claims[0]) {
			t.Fatalf("QEMUProbe: %s; qemu-img, guessing: %+v", claims[0], q)
		}
	default:
		// Which of several wins depends on scores and registration order;
		// Probe refuses such images, so only check it is one of them.
		if q.opened && !slices.Contains(claims, q.format) {
			t.Fatalf("QEMUProbe: %v; qemu-img, guessing: %+v", claims, q)
		}
	}

	info, err := Probe(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		var inv *InvalidError
		if !errors.As(err, &inv) {
			t.Fatalf("Probe failed without an *InvalidError: %v", err)
		}
		return info, err
	}
	if !q.opened {
		// A qcow2 QEMU cannot open is no danger if the qcow2 driver is
		// what failed.
		if info.Format == QCOW2 && sameFailure(QCOW2) {
			return info, nil
		}
		t.Fatalf("Probe accepted %s (%d bytes) but qemu-img, guessing, could not open it: %s", info.Format, info.VirtualSize, q.errText)
	}
	if q.format != info.Format {
		t.Fatalf("Probe accepted %s but qemu-img, guessing, opens it as %s", info.Format, q.format)
	}
	want := info.VirtualSize
	if info.Format == Raw {
		want = (want + 511) / 512 * 512 // QEMU counts whole sectors
	}
	if q.virtualSize != want {
		t.Fatalf("Probe accepted %s of %d bytes; qemu-img says %d", info.Format, info.VirtualSize, q.virtualSize)
	}
	if q.backing != "" || q.dataFile != "" {
		t.Fatalf("Probe accepted %s, but qemu-img sees backing file %q, data file %q", info.Format, q.backing, q.dataFile)
	}
	return info, nil
}

// craftedImages are files made to fool a format probe, and real images of
// every format qemu-img can make, with what Probe must decide ("" for a
// refusal). Each is checked against qemu-img as well.
func craftedImages(t testing.TB, dir string) []struct {
	name string
	data []byte
	want Format
} {
	t.Helper()
	// Extents the descriptors below name; relative names stay in dir.
	if err := os.WriteFile(filepath.Join(dir, "extent"), bytes.Repeat([]byte("host data"), 1024), 0o644); err != nil {
		t.Fatal(err)
	}
	sector := func(s string) []byte { return append([]byte(s), make([]byte, 4096)...) }
	qcow2 := imageformattest.QemuImg(t, dir, "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2", "1M")
	vdiInQCOW2 := bytes.Clone(qcow2)
	binary.LittleEndian.PutUint32(vdiInQCOW2[vdiSignatureOffset:], vdiSignature)
	qcowV1 := imageformattest.QemuImg(t, dir, "-f", "qcow", "v1.qcow", "1M")
	bochs := make([]byte, 512)
	copy(bochs, "Bochs Virtual HD Image")
	copy(bochs[32:], "Redolog")
	copy(bochs[48:], "Growing")
	binary.LittleEndian.PutUint32(bochs[64:], 0x00020000)
	luks2 := sector("LUKS\xba\xbe\x00\x02")
	textAfterSector := append(make([]byte, 512), []byte("version=1\ncreateType=\"monolithicFlat\"\nRW 18 FLAT \"extent\" 0\n")...)

	return []struct {
		name string
		data []byte
		want Format
	}{
		{"raw zeros", make([]byte, 1<<20), Raw},
		{"raw text", bytes.Repeat([]byte("an ordinary disk\n"), 1000), Raw},
		{"raw short", []byte("QF"), Raw},
		{"raw with a descriptor past the first sector", textAfterSector, Raw},
		{"vmdk descriptor version=1 (issue 12)", []byte("version=1\nRW 1 FLAT \"extent\" 0\n"), ""},
		{"vmdk descriptor naming a host file", []byte("version=1\ncreateType=\"monolithicFlat\"\nRW 1 FLAT \"/etc/hostname\" 0\n"), ""},
		{"vmdk descriptor with header line", []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 18 FLAT \"extent\" 0\n"), ""},
		{"vmdk descriptor after comments and blank lines", []byte("# hello\n   \n  \r\n#\nversion=2\r\ncreateType=\"monolithicFlat\"\r\nRW 18 FLAT \"extent\" 0\r\n"), ""},
		{"vmdk descriptor version=3", []byte("version=3\ncreateType=\"monolithicFlat\"\nRW 18 FLAT \"extent\" 0\n"), ""},
		{"version=4 (not QEMU's, refused anyway)", []byte("version=4\nRW 18 FLAT \"extent\" 0\n"), ""},
		{"tab before version= (not QEMU's, refused anyway)", []byte("\tversion=1\nRW 18 FLAT \"extent\" 0\n"), ""},
		{"vmdk sparse magic", sector("KDMV"), ""},
		{"vmdk3 magic", sector("COWD"), ""},
		{"qcow2", qcow2, QCOW2},
		{"qcow2 with a VDI signature inside", vdiInQCOW2, ""},
		{"qcow2 magic alone", []byte(qcow2Magic), ""},
		{"qcow version 1", qcowV1, ""},
		{"qcow2 with a backing file", imageformattest.QemuImg(t, dir, "-f", "qcow2", "-o", "cluster_size=512", "-b", "small.qcow2", "-F", "qcow2", "backed.qcow2", "1M"), ""},
		{"qcow2 with a data file", imageformattest.QemuImg(t, dir, "-f", "qcow2", "-o", "cluster_size=512,data_file=data.raw", "ext.qcow2", "1M"), ""},
		{"vdi", imageformattest.QemuImg(t, dir, "-f", "vdi", "x.vdi", "1M"), ""},
		{"vpc", imageformattest.QemuImg(t, dir, "-f", "vpc", "x.vpc", "1M"), ""},
		{"qed", imageformattest.QemuImg(t, dir, "-f", "qed", "x.qed", "1M"), ""},
		{"parallels", imageformattest.QemuImg(t, dir, "-f", "parallels", "x.parallels", "1M"), ""},
		{"vmdk", imageformattest.QemuImg(t, dir, "-f", "vmdk", "x.vmdk", "1M"), ""},
		{"bochs", bochs, ""},
		{"cloop", sector(cloopMagic), ""},
		{"luks version 2 (not QEMU 7.2's, refused anyway)", luks2, ""},
		{"vhdx magic", sector("vhdxfile"), ""},
		{"parallels magic, wrong version (refused anyway)", sector("WithoutFreeSpace\x01\x00\x00\x00"), ""},
	}
}

// TestProbeAgreesWithQemuImg runs the real qemu-img, without -f, on files
// crafted to fool a format probe: what Probe accepts, QEMU reads the same
// way, and what QEMU would read as another format, Probe refuses.
func TestProbeAgreesWithQemuImg(t *testing.T) {
	requireQemuImg(t)
	dir := oracleDir(t)
	for _, tc := range craftedImages(t, dir) {
		t.Run(tc.name, func(t *testing.T) {
			info, err := agreeWithQemu(t, dir, tc.data)
			if tc.want == "" {
				if err == nil {
					t.Fatalf("accepted as %+v; want a refusal", info)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil || info.Format != tc.want {
				t.Fatalf("got %+v, %v; want %s", info, err, tc.want)
			}
		})
	}
}

// FuzzProbe checks Probe against qemu-img on arbitrary bytes: no panic, no
// error but *InvalidError, and nothing accepted that QEMU, guessing, would
// read as another format or with another file. The seeds run in every
// `go test`; `go test -fuzz FuzzProbe` explores further.
func FuzzProbe(f *testing.F) {
	requireQemuImg(f)
	dir := oracleDir(f)
	for _, tc := range craftedImages(f, dir) {
		seed := tc.data
		if len(seed) > 8192 {
			seed = seed[:8192]
		}
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<20 {
			t.Skip("larger than any header")
		}
		agreeWithQemu(t, dir, data)
	})
}
