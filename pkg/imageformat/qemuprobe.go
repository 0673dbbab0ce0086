package imageformat

import (
	"bytes"
	"encoding/binary"
)

// QEMU picks the format of an image it is not told the format of by asking
// every block driver to score the image's first sector (bdrv_probe_all in
// QEMU's block.c reads BLOCK_PROBE_BUF_SIZE = 512 bytes, zero-filled past
// the end of a short file) and taking the highest score; raw scores 1, so any
// other driver that claims the bytes wins. The functions below are those
// drivers' probe functions (block/*.c, QEMU 7.2 and unchanged since), one
// for one, so that minicloud knows what QEMU would see without ever letting
// QEMU look.
//
// Not reproduced: dmg claims a file by its name alone (".dmg"), and the
// names minicloud gives images are sha256 digests or "disk.qcow2".

// ProbeBufSize is how many leading bytes QEMU's format probe looks at.
const ProbeBufSize = 512

// The drivers QEMU would pick by probing, named as qemu-img -f names them.
const (
	QCOW      Format = "qcow" // qcow version 1, which has backing files too
	VMDK      Format = "vmdk"
	VDI       Format = "vdi"
	VPC       Format = "vpc" // VHD
	VHDX      Format = "vhdx"
	Parallels Format = "parallels"
	Bochs     Format = "bochs"
	Cloop     Format = "cloop"
	LUKS      Format = "luks"
	QED       Format = "qed"
)

// qemuProbes are the block drivers that score an image by its content, in
// the order of QEMU's source tree. Each returns QEMU's score (0: not mine).
var qemuProbes = []struct {
	format Format
	probe  func(buf []byte) int
}{
	{Bochs, probeBochs},
	{Cloop, probeCloop},
	{LUKS, probeLUKS},
	{Parallels, probeParallels},
	{QCOW, probeQCOW},
	{QCOW2, probeQCOW2},
	{QED, probeQED},
	{VDI, probeVDI},
	{VHDX, probeVHDX},
	{VMDK, probeVMDK},
	{VPC, probeVPC},
}

// QEMUProbe returns every format QEMU's block drivers would claim an image
// whose first bytes are head for, in no particular order; none means QEMU
// would open it as raw. More than one means QEMU's choice depends on the
// scores and the order the drivers registered in, and other tools may
// choose differently.
func QEMUProbe(head []byte) []Format {
	buf := make([]byte, ProbeBufSize)
	copy(buf, head)
	var out []Format
	for _, p := range qemuProbes {
		if p.probe(buf) > 0 {
			out = append(out, p.format)
		}
	}
	return out
}

// block/bochs.c: magic, type and subtype are NUL-terminated strings in
// fixed fields, compared with strcmp.
func probeBochs(buf []byte) int {
	cstr := func(field []byte, want string) bool {
		return len(field) > len(want) && string(field[:len(want)]) == want && field[len(want)] == 0
	}
	version := binary.LittleEndian.Uint32(buf[64:])
	if cstr(buf[0:32], "Bochs Virtual HD Image") && cstr(buf[32:48], "Redolog") && cstr(buf[48:64], "Growing") &&
		(version == 0x00020000 || version == 0x00010000) {
		return 100
	}
	return 0
}

// block/cloop.c: the shell-script header of a version 2.0 image.
const cloopMagic = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"

func probeCloop(buf []byte) int {
	if bytes.HasPrefix(buf, []byte(cloopMagic)) {
		return 2
	}
	return 0
}

// crypto/block-luks.c (qcrypto_block_luks_has_format): LUKS version 1.
func probeLUKS(buf []byte) int {
	if bytes.HasPrefix(buf, []byte("LUKS\xba\xbe")) && binary.BigEndian.Uint16(buf[6:]) == 1 {
		return 100
	}
	return 0
}

// block/parallels.c: either magic, and header version 2.
func probeParallels(buf []byte) int {
	magic := string(buf[:16])
	if (magic == "WithoutFreeSpace" || magic == "WithouFreSpacExt") && binary.LittleEndian.Uint32(buf[16:]) == 2 {
		return 100
	}
	return 0
}

// block/qcow.c: the qcow2 magic with version 1.
func probeQCOW(buf []byte) int {
	if string(buf[:4]) == qcow2Magic && binary.BigEndian.Uint32(buf[4:]) == 1 {
		return 100
	}
	return 0
}

// block/qcow2.c: the magic with any version from 2 up (QEMU refuses
// versions it does not know only when it opens the image).
func probeQCOW2(buf []byte) int {
	if string(buf[:4]) == qcow2Magic && binary.BigEndian.Uint32(buf[4:]) >= 2 {
		return 100
	}
	return 0
}

// block/qed.c.
func probeQED(buf []byte) int {
	if string(buf[:4]) == "QED\x00" {
		return 100
	}
	return 0
}

// block/vdi.c: the signature follows a 64-byte free-text banner, so it can
// sit inside another format's header (a qcow2's snapshot table offset).
func probeVDI(buf []byte) int {
	if binary.LittleEndian.Uint32(buf[vdiSignatureOffset:]) == vdiSignature {
		return 100
	}
	return 0
}

// block/vhdx.c.
func probeVHDX(buf []byte) int {
	if string(buf[:8]) == "vhdxfile" {
		return 100
	}
	return 0
}

// block/vpc.c.
func probeVPC(buf []byte) int {
	if string(buf[:8]) == "conectix" {
		return 100
	}
	return 0
}

// block/vmdk.c: the sparse magics, or a text descriptor: comment lines
// ('#' to end of line) and blank lines (spaces, an optional '\r') may come
// before a "version=1|2|3" line. The descriptor's extent lines may name any
// file on the host, which QEMU then opens.
func probeVMDK(buf []byte) int {
	if m := string(buf[:4]); m == "COWD" || m == "KDMV" {
		return 100
	}
	p, end := 0, len(buf)
	for p < end {
		if buf[p] == '#' {
			for p < end && buf[p] != '\n' {
				p++
			}
			p++
			continue
		}
		if buf[p] == ' ' {
			for p < end && buf[p] == ' ' {
				p++
			}
			if p < end && buf[p] == '\r' {
				p++
			}
			if p == end || buf[p] != '\n' {
				return 0
			}
			p++
			continue
		}
		rest := buf[p:]
		for _, v := range []string{"version=1\n", "version=2\n", "version=3\n", "version=1\r\n", "version=2\r\n", "version=3\r\n"} {
			if bytes.HasPrefix(rest, []byte(v)) {
				return 100
			}
		}
		return 0
	}
	return 0
}

// looksLikeVMDKDescriptor is stricter than QEMU's probe, for other tools
// and other QEMU versions: any "version=" line after comments and lines of
// white space, whatever follows it, and a descriptor's usual first line
// anywhere in the first sector.
func looksLikeVMDKDescriptor(head []byte) bool {
	if len(head) > ProbeBufSize {
		head = head[:ProbeBufSize]
	}
	if bytes.Contains(head, []byte("# Disk DescriptorFile")) {
		return true
	}
	for line := range bytes.SplitSeq(head, []byte("\n")) {
		trimmed := bytes.TrimLeft(line, " \t\r\v\f")
		if len(trimmed) == 0 || trimmed[0] == '#' {
			continue
		}
		return bytes.HasPrefix(bytes.ToLower(trimmed), []byte("version="))
	}
	return false
}
