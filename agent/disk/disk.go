// Package disk manages VM disks on a hypervisor host: qcow2 overlays backed
// by an image in the image cache, so that a VM's disk is copy-on-write and a
// create costs milliseconds, never a copy of the image.
//
// Every operation is idempotent and crash-safe: an overlay is created under
// a temporary name and renamed into place, so a path either does not exist
// or is a complete overlay; a crash leaves at most a temporary file that List
// reports for garbage collection.
package disk

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/imageformat"
)

// tmpSuffix marks an overlay being created.
const tmpSuffix = ".tmp"

// Info is what qemu-img reports about a disk file.
type Info struct {
	Format        string // "qcow2", "raw"
	VirtualSize   int64  // guest-visible bytes
	ActualSize    int64  // bytes allocated on the host
	BackingFile   string // absolute, "" when none
	BackingFormat string
	// DataFile is a qcow2 external data file, "" when none.
	DataFile string
}

// CreateOverlay makes path a qcow2 overlay of backingPath (format
// backingFormat: "qcow2" or "raw") with a virtual size of sizeBytes (0: the
// backing file's size). When path already is an overlay of the same backing
// file it is left untouched (the guest's writes live there); when it is
// something else the call fails with errdefs.Conflict rather than destroying
// data. A size smaller than the backing file is refused.
func CreateOverlay(ctx context.Context, path, backingPath, backingFormat string, sizeBytes int64) error {
	if !filepath.IsAbs(path) || !filepath.IsAbs(backingPath) {
		return errdefs.Invalid("create overlay %s: overlay and backing paths must be absolute (backing %q)", path, backingPath)
	}
	if backingFormat != "qcow2" && backingFormat != "raw" {
		return errdefs.Invalid("create overlay %s: backing format must be qcow2 or raw, got %q", path, backingFormat)
	}
	if sizeBytes < 0 {
		return errdefs.Invalid("create overlay %s: negative size %d", path, sizeBytes)
	}
	backing, err := inspectBacking(ctx, backingPath, backingFormat)
	if err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	if backing.Format != backingFormat {
		return errdefs.Invalid("create overlay %s: backing file %s is %s, not %s", path, backingPath, backing.Format, backingFormat)
	}
	// An image is untrusted input: one that refers to another file would
	// make QEMU open a file of the host's through every VM disk built on it.
	// The image service refuses such uploads; inspectBacking checked the
	// bytes again and qemu-img, told the format, confirms.
	if backing.BackingFile != "" || backing.DataFile != "" {
		return errdefs.Invalid("create overlay %s: image %s refers to another file (backing %q, data file %q): refused",
			path, backingPath, backing.BackingFile, backing.DataFile)
	}
	if sizeBytes != 0 && sizeBytes < backing.VirtualSize {
		return errdefs.Invalid("create overlay %s: size %d is smaller than the image (%d bytes)", path, sizeBytes, backing.VirtualSize)
	}

	if existing, err := inspectOverlay(ctx, path); err == nil {
		// The recorded backing format too: without it QEMU would guess the
		// image's format each time it opens the VM's disk.
		if existing.Format == "qcow2" && existing.BackingFile == backingPath && existing.BackingFormat == backingFormat {
			return nil
		}
		return errdefs.Conflict("create overlay %s: a different disk exists there (format %s, backing %q of format %q)",
			path, existing.Format, existing.BackingFile, existing.BackingFormat)
	} else if !errdefs.IsNotFound(err) {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}

	if sizeBytes == 0 {
		sizeBytes = backing.VirtualSize
	}
	tmp := path + tmpSuffix
	_ = os.Remove(tmp) // left by a crash: never a finished disk
	// The header is written in Go, not by a qemu-img process: an empty
	// overlay is a few hundred bytes of documented layout, and a process
	// per VM was most of the disk step of ten concurrent creates on a
	// loaded host (hack/agentbench). 0600: a VM's disk is its owner's
	// data, and libvirt hands the file to QEMU's user while the domain runs.
	if err := writeOverlay(tmp, backingPath, imageformat.Format(backingFormat), sizeBytes); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

// fileIdentity tells one version of a file from another: a file written
// anew (or renamed into place) has another inode, and any change of content
// or metadata moves its ctime (at the file system's timestamp granularity),
// which no caller can set back.
type fileIdentity struct {
	path       string
	dev, inode uint64
	size       int64
	mtime      int64
	ctime      int64
}

// backingInfos remembers what was learned of a backing file per version.
// Every VM disk on a host is an overlay of one of a few cached images, and a
// qemu-img process per create to re-read the same immutable header was
// about half of the disk step of ten concurrent creates on a loaded host
// (hack/agentbench). A file that changed in any way is inspected again, so
// the checks in CreateOverlay always judge the current header.
var backingInfos sync.Map // backingKey -> Info

type backingKey struct {
	fileIdentity
	format string
}

// inspectBacking judges a cached image, untrusted input, before any
// qemu-img process reads it: its bytes must be of the format the image
// service recorded, and something no QEMU driver would take for another
// format (imageformat.CheckFile, in Go). Only then does qemu-img read it,
// told the format: left to guess, it would follow a VMDK descriptor's
// extents to any file of the host, as root.
func inspectBacking(ctx context.Context, path, format string) (Info, error) {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Info{}, errdefs.NotFound("disk %s does not exist", path)
		}
		return Info{}, fmt.Errorf("inspect disk %s: %w", path, err)
	}
	var key backingKey
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		key = backingKey{fileIdentity{path: path, dev: uint64(sys.Dev), inode: sys.Ino, size: st.Size(),
			mtime: st.ModTime().UnixNano(), ctime: sys.Ctim.Nano()}, format}
		if info, ok := backingInfos.Load(key); ok {
			return info.(Info), nil
		}
	}
	if _, err := imageformat.CheckFile(path, imageformat.Format(format)); err != nil {
		var inv *imageformat.InvalidError
		if errors.As(err, &inv) {
			return Info{}, errdefs.Invalid("image %s: %s", path, inv.Reason)
		}
		return Info{}, fmt.Errorf("inspect disk %s: %w", path, err)
	}
	info, err := Inspect(ctx, path, format)
	if err != nil {
		return info, err
	}
	if key.path != "" {
		backingInfos.Store(key, info)
	}
	return info, nil
}

// inspectOverlay reads what is at a VM disk's path. Only a file that starts
// as a qcow2 and that no other QEMU driver would claim is handed to
// qemu-img (as qcow2); anything else there is reported as the format QEMU
// would take it for, for CreateOverlay to refuse as a conflict.
func inspectOverlay(ctx context.Context, path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Info{}, errdefs.NotFound("disk %s does not exist", path)
		}
		return Info{}, fmt.Errorf("inspect disk %s: %w", path, err)
	}
	buf := make([]byte, overlayHeaderBytes)
	n, err := io.ReadFull(f, buf)
	f.Close()
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return Info{}, fmt.Errorf("inspect disk %s: %w", path, err)
	}
	buf = buf[:n]
	claims := imageformat.QEMUProbe(buf[:min(n, imageformat.ProbeBufSize)])
	if len(claims) != 1 || claims[0] != imageformat.QCOW2 {
		what := "raw"
		if len(claims) > 0 {
			what = fmt.Sprint(claims)
		}
		return Info{Format: what}, nil
	}
	sum, cacheable := overlayHeaderSum(buf)
	if cacheable {
		if info, ok := overlayInfos.load(path, sum); ok {
			return info, nil
		}
	}
	info, err := Inspect(ctx, path, "qcow2")
	if err == nil && cacheable {
		overlayInfos.store(path, overlayInfo{sum: sum, info: info})
	}
	return info, err
}

// overlayInfos remembers what qemu-img said of each VM disk, by the bytes
// of its header. The agent checks a VM's overlay on every reconcile pass
// (each VM once a minute at rest), and a qemu-img process per check was
// most of a real pass's time on a host full of guests. What qemu-img
// reports of a qcow2 without opening its backing chain (format, backing
// file and its format, virtual size) is read from the header, its
// extensions and the backing file name, all in the first
// overlayHeaderBytes of the file here: while those bytes are the same, so
// is its answer. A guest's writes land in other clusters; a header QEMU
// rewrites (a grown refcount table, a dirty bit) or a file replaced is
// inspected again.
//
// Its ActualSize is then that of an earlier check: CreateOverlay, the one
// caller, judges format and backing only. A path reused for another file
// is judged by its own header. Entries leave with their disk (Remove) or
// their VM's directory (ForgetUnder), and there are never more than
// maxOverlayInfos of them: a host whose VMs' directories vanish behind the
// agent's back only costs qemu-img runs again, never memory.
var overlayInfos = overlayMemo{byPath: map[string]overlayInfo{}}

// maxOverlayInfos bounds the memo: far more disks than a host runs (the
// density target is 50 VMs), a few hundred bytes each.
const maxOverlayInfos = 4096

// overlayMemo is the memo's map under its lock.
type overlayMemo struct {
	mu     sync.Mutex
	byPath map[string]overlayInfo
}

func (m *overlayMemo) load(path string, sum [sha256.Size]byte) (Info, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.byPath[path]
	return e.info, ok && e.sum == sum
}

func (m *overlayMemo) store(path string, e overlayInfo) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.byPath[path]; !ok && len(m.byPath) >= maxOverlayInfos {
		// Full: drop any one entry (map order is random). Its disk, if it
		// still exists, is inspected again on its next check.
		for p := range m.byPath {
			delete(m.byPath, p)
			break
		}
	}
	m.byPath[path] = e
}

// forget drops the entries of path and, with under, of every path inside
// the directory path.
func (m *overlayMemo) forget(path string, under bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.byPath, path)
	if !under {
		return
	}
	prefix := filepath.Clean(path) + string(filepath.Separator)
	for p := range m.byPath {
		if strings.HasPrefix(p, prefix) {
			delete(m.byPath, p)
		}
	}
}

func (m *overlayMemo) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.byPath)
}

// ForgetUnder drops what this package remembers of the disks inside dir:
// the agent calls it when it removes or trashes a VM's directory whole.
func ForgetUnder(dir string) { overlayInfos.forget(dir, true) }

// inspections counts qemu-img processes (tests see the cache at work).
var inspections atomic.Int64

type overlayInfo struct {
	sum  [sha256.Size]byte
	info Info
}

// overlayHeaderBytes is how much of an overlay the header sum covers: the
// qcow2 header, its extensions and the backing file name (at most 1023
// bytes in QEMU) as QEMU and imageformat.WriteQCOW2Overlay lay them out.
const overlayHeaderBytes = 4096

// overlayHeaderSum is the sum of a qcow2 header read as b, and whether b
// holds all that qemu-img reads of it: a backing file name that ends past
// b (laid out elsewhere by some other tool) is not covered, so such a file
// is inspected every time.
func overlayHeaderSum(b []byte) ([sha256.Size]byte, bool) {
	if len(b) < 20 {
		return [sha256.Size]byte{}, false
	}
	end := binary.BigEndian.Uint64(b[8:]) + uint64(binary.BigEndian.Uint32(b[16:]))
	if end > uint64(len(b)) {
		return [sha256.Size]byte{}, false
	}
	return sha256.Sum256(b), true
}

// Remove deletes a disk (and a leftover temporary of it). Absent is fine.
func Remove(path string) error {
	overlayInfos.forget(path, false)
	for _, p := range []string{path + tmpSuffix, path} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove disk %s: %w", p, err)
		}
	}
	return nil
}

// List returns the disk files directly inside dir whose name ends in suffix
// (e.g. ".qcow2"), plus the temporaries a crash left behind (names ending in
// suffix+".tmp"), for the caller to compare with the VMs it should have.
// A missing dir lists as empty.
func List(dir, suffix string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list disks in %s: %w", dir, err)
	}
	var out []string
	for _, e := range ents {
		n := e.Name()
		if e.Type().IsRegular() && (strings.HasSuffix(n, suffix) || strings.HasSuffix(n, suffix+tmpSuffix)) {
			out = append(out, filepath.Join(dir, n))
		}
	}
	return out, nil
}

// Inspect reads the header of a disk file of the given format ("qcow2",
// "raw") with qemu-img, no backing chain opened. The format is passed to
// qemu-img, never guessed: the caller knows it (or has probed it with
// package imageformat). A missing file is errdefs.NotFound.
func Inspect(ctx context.Context, path, format string) (Info, error) {
	if format != "qcow2" && format != "raw" {
		return Info{}, errdefs.Invalid("inspect disk %s: format must be qcow2 or raw, got %q", path, format)
	}
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Info{}, errdefs.NotFound("disk %s does not exist", path)
		}
		return Info{}, fmt.Errorf("inspect disk %s: %w", path, err)
	}
	inspections.Add(1)
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "-f", format, "--output=json", "-U", path).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return Info{}, fmt.Errorf("inspect disk %s: qemu-img info: %w: %s", path, err, strings.TrimSpace(string(ee.Stderr)))
		}
		return Info{}, fmt.Errorf("inspect disk %s: qemu-img info: %w", path, err)
	}
	var raw struct {
		Format                string `json:"format"`
		VirtualSize           int64  `json:"virtual-size"`
		ActualSize            int64  `json:"actual-size"`
		BackingFilename       string `json:"backing-filename"`
		FullBackingFilename   string `json:"full-backing-filename"`
		BackingFilenameFormat string `json:"backing-filename-format"`
		FormatSpecific        struct {
			Data struct {
				DataFile string `json:"data-file"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		return Info{}, fmt.Errorf("inspect disk %s: parse qemu-img info: %w", path, err)
	}
	backing := raw.FullBackingFilename
	if backing == "" {
		backing = raw.BackingFilename
	}
	return Info{Format: raw.Format, VirtualSize: raw.VirtualSize, ActualSize: raw.ActualSize,
		BackingFile: backing, BackingFormat: raw.BackingFilenameFormat, DataFile: raw.FormatSpecific.Data.DataFile}, nil
}

// writeOverlay writes an empty qcow2 overlay to a new file at path and
// syncs it.
func writeOverlay(path, backingPath string, backingFormat imageformat.Format, sizeBytes int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := imageformat.WriteQCOW2Overlay(f, backingPath, backingFormat, sizeBytes)
	if err != nil {
		return err
	}
	if err := f.Truncate(n); err != nil {
		return fmt.Errorf("truncate %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return f.Close()
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
