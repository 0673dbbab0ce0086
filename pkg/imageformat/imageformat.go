// Package imageformat detects the format of an untrusted disk image from its
// bytes and refuses images that would make QEMU open any other file.
//
// A qcow2 image can name a backing file, an external data file or an
// encryption key source in its header, and a VMDK descriptor (plain text)
// names its extents, which can be any file of the host; handing such an
// image to QEMU on a hypervisor host would let a tenant read host files.
// minicloud accepts raw and qcow2 images only, and an image is raw only if
// no QEMU block driver would claim it (see QEMUProbe): the consumers pass
// the probed format explicitly (qemu-img -f/-F, libvirt's driver type) and
// never let QEMU guess, and even a tool that guesses sees the same image.
// docs/security.md ("Untrusted images") has the rules and the reasons.
package imageformat

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
)

// Format is a disk image format.
type Format string

const (
	Raw   Format = "raw"
	QCOW2 Format = "qcow2"
)

// Info is what Probe learned about an image.
type Info struct {
	Format Format
	// VirtualSize is the guest-visible size in bytes.
	VirtualSize int64
	// QCOW2Version is 2 or 3 for qcow2 images, 0 otherwise.
	QCOW2Version uint32
}

// InvalidError says why an image was refused. Callers map it to an
// invalid-argument error for the uploader.
type InvalidError struct {
	Reason string
}

func (e *InvalidError) Error() string { return "invalid image: " + e.Reason }

func invalid(format string, args ...any) error {
	return &InvalidError{Reason: fmt.Sprintf(format, args...)}
}

// qcow2 on-disk layout (docs/interop/qcow2.txt in QEMU).
const (
	qcow2Magic = "QFI\xfb"

	v2HeaderLen    = 72
	v3MinHeaderLen = 104

	minClusterBits = 9
	maxClusterBits = 21

	// Incompatible feature bits QEMU knows about. An image with any other
	// bit set cannot be read correctly, so it is refused.
	incompatDirty          = 1 << 0
	incompatCorrupt        = 1 << 1
	incompatExternalData   = 1 << 2
	incompatCompressionTyp = 1 << 3
	incompatExtendedL2     = 1 << 4
	incompatKnown          = incompatDirty | incompatCorrupt | incompatExternalData |
		incompatCompressionTyp | incompatExtendedL2

	// Header extension types.
	extEnd             = 0x00000000
	extBackingFormat   = 0xe2792aca
	extFeatureNames    = 0x6803f857
	extBitmaps         = 0x23852875
	extEncryption      = 0x0537be77
	extExternalData    = 0x44415441
	extensionAlignment = 8
)

// HeaderReadSize is how many leading bytes Probe reads at most: the header
// and its extensions live in the first cluster, and clusters are at most
// 2 MiB.
const HeaderReadSize = 1 << maxClusterBits

// Probe detects the format of the image in r (size bytes long) from its
// content and validates it. It returns an *InvalidError for images that must
// not be used and a plain error when reading fails.
//
// The image is judged by what QEMU would make of it, not only by what it
// claims: an image is raw only if no QEMU block driver would claim it when
// probing (QEMUProbe), so that a consumer that lets QEMU guess, or a tool
// that guesses, sees the same raw image minicloud stored; it is qcow2 only
// if the qcow2 driver alone claims it and its header names no other file.
// Everything else is refused, as OpenStack's format_inspector refuses
// images that match several formats (CVE-2024-32498).
func Probe(r io.ReaderAt, size int64) (Info, error) {
	n := min(size, HeaderReadSize)
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, 0); err != nil && err != io.EOF {
		return Info{}, fmt.Errorf("read image header: %w", err)
	}
	claims := QEMUProbe(buf)
	switch {
	case len(claims) > 1:
		names := make([]string, len(claims))
		for i, f := range claims {
			names[i] = string(f)
		}
		return Info{}, invalid("the image matches several formats (%s), so tools could read it differently; refused", strings.Join(names, ", "))
	case len(claims) == 1 && claims[0] != QCOW2:
		return Info{}, foreign(claims[0])
	case len(claims) == 1 || bytes.HasPrefix(buf, []byte(qcow2Magic)):
		// A qcow2 magic QEMU would not claim (a short file, version 0)
		// is no raw disk either: ParseQCOW2Header refuses it.
		return ParseQCOW2Header(buf)
	}
	// Raw. Stricter than QEMU 7.2's probes, for other QEMU versions and
	// other tools: leading bytes of other formats, and VMDK descriptors
	// that QEMU's probe happens to miss.
	for _, m := range foreignMagics {
		if bytes.HasPrefix(buf, []byte(m.magic)) {
			return Info{}, foreign(m.format)
		}
	}
	if looksLikeVMDKDescriptor(buf) {
		return Info{}, foreign(VMDK)
	}
	return Info{Format: Raw, VirtualSize: size}, nil
}

// Check probes the image in r and refuses it unless it is of the declared
// format: a file stored as raw that now looks like qcow2 (or anything else)
// is not the image that was checked on upload.
func Check(r io.ReaderAt, size int64, declared Format) (Info, error) {
	info, err := Probe(r, size)
	if err != nil {
		return info, err
	}
	if info.Format != declared {
		return Info{}, invalid("the image is %s, not %s as declared", info.Format, declared)
	}
	return info, nil
}

// CheckFile is Check on the file at path.
func CheckFile(path string, declared Format) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return Info{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Info{}, err
	}
	if !st.Mode().IsRegular() {
		return Info{}, invalid("%s is not a regular file", path)
	}
	return Check(f, st.Size(), declared)
}

const (
	vdiSignatureOffset = 64
	vdiSignature       = 0xbeda107f
)

var formatNames = map[Format]string{
	QCOW:      "a qcow (version 1) image",
	VMDK:      "a VMDK image or descriptor",
	VDI:       "a VDI image",
	VPC:       "a VHD image",
	VHDX:      "a VHDX image",
	Parallels: "a Parallels image",
	Bochs:     "a Bochs image",
	Cloop:     "a cloop image",
	LUKS:      "a LUKS volume",
	QED:       "a QED image",
}

// foreign refuses an image QEMU (or another tool) would open as format f.
func foreign(f Format) error {
	return invalid("the image looks like %s (qemu-img format %q), and only raw and qcow2 images are accepted; "+
		"convert it on your machine: qemu-img convert -f %s -O qcow2 IMAGE IMAGE.qcow2", formatNames[f], f, f)
}

// foreignMagics are leading bytes of formats that QEMU 7.2's probes need
// more than (a version field, a whole header) but that another version or
// tool may take as enough.
var foreignMagics = []struct {
	magic  string
	format Format
}{
	{"KDMV", VMDK},
	{"COWD", VMDK},
	{"QED\x00", QED},
	{"vhdxfile", VHDX},
	{"conectix", VPC},
	{"LUKS\xba\xbe", LUKS},
	{"WithoutFreeSpace", Parallels},
	{"WithouFreSpacExt", Parallels},
	{"Bochs Virtual HD Image", Bochs},
	{"#!/bin/sh\n#V2.0 Format", Cloop},
}

// ParseQCOW2Header validates a qcow2 header given the image's leading bytes
// (at least the first cluster, or the whole file if it is shorter). It
// refuses backing files, external data files, encryption and unknown
// incompatible features.
func ParseQCOW2Header(b []byte) (Info, error) {
	if len(b) < v2HeaderLen {
		return Info{}, invalid("qcow2 header truncated (%d bytes)", len(b))
	}
	if string(b[:4]) != qcow2Magic {
		return Info{}, invalid("not a qcow2 image")
	}
	be := binary.BigEndian
	version := be.Uint32(b[4:])
	backingOffset := be.Uint64(b[8:])
	backingSize := be.Uint32(b[16:])
	clusterBits := be.Uint32(b[20:])
	virtualSize := be.Uint64(b[24:])
	cryptMethod := be.Uint32(b[32:])

	if version != 2 && version != 3 {
		return Info{}, invalid("unsupported qcow2 version %d", version)
	}
	if backingOffset != 0 || backingSize != 0 {
		return Info{}, invalid("qcow2 image has a backing file; upload a standalone image (qemu-img convert -O qcow2)")
	}
	if clusterBits < minClusterBits || clusterBits > maxClusterBits {
		return Info{}, invalid("qcow2 cluster_bits %d out of range [%d, %d]", clusterBits, minClusterBits, maxClusterBits)
	}
	if cryptMethod != 0 {
		return Info{}, invalid("encrypted qcow2 images are not supported")
	}
	if virtualSize > math.MaxInt64 {
		return Info{}, invalid("qcow2 virtual size %d too large", virtualSize)
	}
	info := Info{Format: QCOW2, VirtualSize: int64(virtualSize), QCOW2Version: version}

	clusterSize := uint64(1) << clusterBits
	headerLen := uint64(v2HeaderLen)
	if version == 3 {
		if len(b) < v3MinHeaderLen {
			return Info{}, invalid("qcow2 v3 header truncated (%d bytes)", len(b))
		}
		incompat := be.Uint64(b[72:])
		headerLen = uint64(be.Uint32(b[100:]))
		if unknown := incompat &^ incompatKnown; unknown != 0 {
			return Info{}, invalid("qcow2 image uses unknown incompatible features %#x", unknown)
		}
		if incompat&incompatExternalData != 0 {
			return Info{}, invalid("qcow2 image has an external data file; upload a standalone image")
		}
		if incompat&incompatCorrupt != 0 {
			return Info{}, invalid("qcow2 image is marked corrupt; repair it with qemu-img check -r all")
		}
		if headerLen < v3MinHeaderLen || headerLen%8 != 0 {
			return Info{}, invalid("qcow2 header_length %d invalid", headerLen)
		}
	}
	if headerLen > clusterSize {
		return Info{}, invalid("qcow2 header_length %d exceeds the cluster size %d", headerLen, clusterSize)
	}
	if err := checkExtensions(b, headerLen, clusterSize); err != nil {
		return Info{}, err
	}
	return info, nil
}

// checkExtensions walks the header extensions that follow the header inside
// the first cluster and refuses those that point QEMU at another file or at
// key material.
func checkExtensions(b []byte, off, clusterSize uint64) error {
	for {
		if off+8 > clusterSize {
			return invalid("qcow2 header extensions are not terminated within the first cluster")
		}
		typ := u32At(b, off)
		length := uint64(u32At(b, off+4))
		if typ == extEnd {
			return nil
		}
		switch typ {
		case extExternalData:
			return invalid("qcow2 image names an external data file; upload a standalone image")
		case extBackingFormat:
			return invalid("qcow2 image carries a backing file format; upload a standalone image")
		case extEncryption:
			return invalid("encrypted qcow2 images are not supported")
		case extFeatureNames, extBitmaps:
			// Harmless: names of features and persistent dirty bitmaps.
		}
		padded := (length + extensionAlignment - 1) / extensionAlignment * extensionAlignment
		next := off + 8 + padded
		if next > clusterSize {
			return invalid("qcow2 header extension %#x overruns the first cluster", typ)
		}
		off = next
	}
}

// u32At reads a big-endian uint32 at off. Bytes past the end of b read as
// zero, as QEMU reads a file shorter than its first cluster.
func u32At(b []byte, off uint64) uint32 {
	var w [4]byte
	if off < uint64(len(b)) {
		copy(w[:], b[off:])
	}
	return binary.BigEndian.Uint32(w[:])
}
