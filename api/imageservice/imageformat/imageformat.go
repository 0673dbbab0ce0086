// Package imageformat detects the format of an untrusted disk image from its
// bytes and refuses images that would make QEMU open any other file.
//
// A qcow2 image can name a backing file, an external data file or an
// encryption key source in its header; handing such an image to QEMU on a
// hypervisor host would let a tenant read host files. Everything that is not
// qcow2 is treated as raw, which QEMU opens without interpreting the
// content, as long as the consumer passes format=raw explicitly (and never
// lets QEMU probe).
package imageformat

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
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
func Probe(r io.ReaderAt, size int64) (Info, error) {
	n := min(size, HeaderReadSize)
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, 0); err != nil && err != io.EOF {
		return Info{}, fmt.Errorf("read image header: %w", err)
	}
	if bytes.HasPrefix(buf, []byte(qcow2Magic)) {
		return ParseQCOW2Header(buf)
	}
	// Raw is safe only if nothing downstream takes it for another format.
	// Tools that probe (qemu-img info without -f) would read these as
	// formats that can name other files, so they are refused rather than
	// stored as "raw".
	for _, m := range foreignMagics {
		if bytes.HasPrefix(buf, []byte(m.magic)) {
			return Info{}, invalid("the image looks like %s, which is not supported; convert it with qemu-img convert -O qcow2", m.format)
		}
	}
	// VDI's signature follows a free-text banner.
	if len(buf) >= vdiSignatureOffset+4 && binary.LittleEndian.Uint32(buf[vdiSignatureOffset:]) == vdiSignature {
		return Info{}, invalid("the image looks like a VDI image, which is not supported; convert it with qemu-img convert -O qcow2")
	}
	return Info{Format: Raw, VirtualSize: size}, nil
}

const (
	vdiSignatureOffset = 64
	vdiSignature       = 0xbeda107f
)

// foreignMagics are the leading bytes of image formats other than qcow2
// that QEMU would recognise by probing.
var foreignMagics = []struct{ magic, format string }{
	{"KDMV", "a VMDK sparse image"},
	{"COWD", "a VMDK (ESX) sparse image"},
	{"# Disk DescriptorFile", "a VMDK descriptor"},
	{"QED\x00", "a QED image"},
	{"vhdxfile", "a VHDX image"},
	{"conectix", "a VHD image"},
	{"LUKS\xba\xbe", "a LUKS volume"},
	{"WithoutFreeSpace", "a Parallels image"},
	{"WithouFreSpacExt", "a Parallels image"},
	{"Bochs Virtual HD Image", "a Bochs image"},
	{"#!/bin/sh\n#V2.0 Format", "a cloop image"},
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
