package imageformat

import (
	"encoding/binary"
	"fmt"
	"io"
)

// The layout of an empty qcow2 overlay, as `qemu-img create -f qcow2 -b
// BACKING -F FORMAT` lays it out (docs/interop/qcow2.txt in QEMU): version
// 3, 64 KiB clusters, 16-bit refcounts, and four kinds of metadata cluster —
// the header (with its extensions and the backing file's name), the
// refcount table, one refcount block, and the L1 table. No L2 table and no
// data cluster exist until the guest writes.
const (
	overlayClusterBits   = 16
	overlayClusterSize   = 1 << overlayClusterBits
	overlayRefcountOrder = 4 // 16-bit refcounts, QEMU's default
	// overlayHeaderLen is the v3 header with the compression type byte,
	// padded to 8 bytes (QEMU ≥ 5.1 writes 112).
	overlayHeaderLen = 112

	overlayRefcountTableOffset = 1 * overlayClusterSize
	overlayRefcountBlockOffset = 2 * overlayClusterSize
	overlayL1Offset            = 3 * overlayClusterSize

	// maxL1Bytes is QEMU's QCOW_MAX_L1_SIZE: it refuses to open an image
	// with a larger L1 table (64 KiB clusters: 2 PiB of virtual size).
	maxL1Bytes = 32 << 20
	// maxBackingNameLen is QEMU's limit on a backing file name (1023 bytes).
	maxBackingNameLen = 1023
)

// WriteQCOW2Overlay writes into w (an empty file) the qcow2 image of an
// empty copy-on-write overlay of backingPath, whose format (raw or qcow2)
// is recorded in a backing format header extension so that QEMU never
// probes the backing file, with a guest-visible size of virtualSize bytes
// (rounded up to 512 as qemu-img does). It returns the file's length: the
// caller truncates the file to it, since the L1 table's zeros are not
// written. The bytes are those qemu-img create writes, less the feature
// name table (an optional extension that only names feature bits for
// error messages), so that creating a VM disk costs no process.
func WriteQCOW2Overlay(w io.WriterAt, backingPath string, backingFormat Format, virtualSize int64) (int64, error) {
	if backingFormat != Raw && backingFormat != QCOW2 {
		return 0, fmt.Errorf("qcow2 overlay: backing format must be raw or qcow2, got %q", backingFormat)
	}
	if backingPath == "" || len(backingPath) > maxBackingNameLen {
		return 0, fmt.Errorf("qcow2 overlay: backing file name of %d bytes (1 to %d allowed)", len(backingPath), maxBackingNameLen)
	}
	if virtualSize <= 0 {
		return 0, fmt.Errorf("qcow2 overlay: virtual size %d must be positive", virtualSize)
	}
	virtualSize = (virtualSize + 511) &^ 511
	// An L2 table holds clusterSize/8 entries, each mapping one cluster.
	const bytesPerL1Entry = overlayClusterSize / 8 * overlayClusterSize
	l1Entries := (virtualSize + bytesPerL1Entry - 1) / bytesPerL1Entry
	if l1Entries*8 > maxL1Bytes {
		return 0, fmt.Errorf("qcow2 overlay: virtual size %d is beyond what QEMU opens", virtualSize)
	}
	l1Clusters := (l1Entries*8 + overlayClusterSize - 1) / overlayClusterSize
	metadataClusters := 3 + l1Clusters // header, refcount table, refcount block, L1

	hdr := make([]byte, 0, 512)
	be := binary.BigEndian
	hdr = append(hdr, qcow2Magic...)
	hdr = be.AppendUint32(hdr, 3)                          // version
	hdr = be.AppendUint64(hdr, 0)                          // backing_file_offset, set below
	hdr = be.AppendUint32(hdr, uint32(len(backingPath)))   // backing_file_size
	hdr = be.AppendUint32(hdr, overlayClusterBits)         // cluster_bits
	hdr = be.AppendUint64(hdr, uint64(virtualSize))        // size
	hdr = be.AppendUint32(hdr, 0)                          // crypt_method
	hdr = be.AppendUint32(hdr, uint32(l1Entries))          // l1_size
	hdr = be.AppendUint64(hdr, overlayL1Offset)            // l1_table_offset
	hdr = be.AppendUint64(hdr, overlayRefcountTableOffset) // refcount_table_offset
	hdr = be.AppendUint32(hdr, 1)                          // refcount_table_clusters
	hdr = be.AppendUint32(hdr, 0)                          // nb_snapshots
	hdr = be.AppendUint64(hdr, 0)                          // snapshots_offset
	hdr = be.AppendUint64(hdr, 0)                          // incompatible_features
	hdr = be.AppendUint64(hdr, 0)                          // compatible_features
	hdr = be.AppendUint64(hdr, 0)                          // autoclear_features
	hdr = be.AppendUint32(hdr, overlayRefcountOrder)       // refcount_order
	hdr = be.AppendUint32(hdr, overlayHeaderLen)           // header_length
	hdr = append(hdr, 0, 0, 0, 0, 0, 0, 0, 0)              // compression_type zlib, padding
	hdr = be.AppendUint32(hdr, extBackingFormat)           // the backing file's format,
	hdr = be.AppendUint32(hdr, uint32(len(backingFormat))) // so QEMU never guesses it
	hdr = append(hdr, backingFormat...)
	for len(hdr)%extensionAlignment != 0 {
		hdr = append(hdr, 0)
	}
	hdr = be.AppendUint32(hdr, extEnd)
	hdr = be.AppendUint32(hdr, 0)
	be.PutUint64(hdr[8:], uint64(len(hdr))) // backing_file_offset
	hdr = append(hdr, backingPath...)

	// The refcount table's one entry points at the one refcount block,
	// which counts one reference for each metadata cluster.
	table := be.AppendUint64(nil, overlayRefcountBlockOffset)
	block := make([]byte, 0, 2*metadataClusters)
	for range metadataClusters {
		block = be.AppendUint16(block, 1)
	}
	for _, part := range []struct {
		b   []byte
		off int64
	}{{hdr, 0}, {table, overlayRefcountTableOffset}, {block, overlayRefcountBlockOffset}} {
		if _, err := w.WriteAt(part.b, part.off); err != nil {
			return 0, fmt.Errorf("qcow2 overlay: write at %#x: %w", part.off, err)
		}
	}
	// The L1 table is all zeros (nothing allocated): the caller's truncate
	// to this length makes it, without writing a block.
	return overlayL1Offset + l1Entries*8, nil
}
