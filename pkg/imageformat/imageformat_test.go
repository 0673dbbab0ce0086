package imageformat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/minicloud/minicloud/pkg/imageformat/imageformattest"
)

// header builds a qcow2 v3 header with the given fields and extensions,
// padded to one 64 KiB cluster.
type header struct {
	version       uint32
	backingOffset uint64
	backingSize   uint32
	clusterBits   uint32
	size          uint64
	crypt         uint32
	incompat      uint64
	headerLen     uint32
	exts          [][2]any // {type uint32, data []byte}
	truncate      int
}

func (h header) bytes() []byte {
	if h.version == 0 {
		h.version = 3
	}
	if h.clusterBits == 0 {
		h.clusterBits = 16
	}
	if h.headerLen == 0 {
		h.headerLen = 112
	}
	b := make([]byte, 1<<h.clusterBits)
	be := binary.BigEndian
	copy(b, qcow2Magic)
	be.PutUint32(b[4:], h.version)
	be.PutUint64(b[8:], h.backingOffset)
	be.PutUint32(b[16:], h.backingSize)
	be.PutUint32(b[20:], h.clusterBits)
	be.PutUint64(b[24:], h.size)
	be.PutUint32(b[32:], h.crypt)
	off := v2HeaderLen
	if h.version == 3 {
		be.PutUint64(b[72:], h.incompat)
		be.PutUint32(b[96:], 4)
		be.PutUint32(b[100:], h.headerLen)
		off = int(h.headerLen)
	}
	for _, e := range h.exts {
		data := e[1].([]byte)
		be.PutUint32(b[off:], e[0].(uint32))
		be.PutUint32(b[off+4:], uint32(len(data)))
		copy(b[off+8:], data)
		off += 8 + (len(data)+7)/8*8
	}
	if h.truncate > 0 {
		b = b[:h.truncate]
	}
	return b
}

func TestParseQCOW2Header(t *testing.T) {
	for _, tc := range []struct {
		name    string
		h       header
		wantErr bool
	}{
		{"plain v3", header{size: 1 << 30}, false},
		{"plain v2", header{version: 2, size: 5 << 20}, false},
		{"dirty bit is fine", header{size: 1, incompat: incompatDirty}, false},
		{"feature name table is fine", header{size: 1, exts: [][2]any{{uint32(extFeatureNames), []byte("xxxxxxxxxxxx")}}}, false},
		{"unknown extension is skipped", header{size: 1, exts: [][2]any{{uint32(0x12345678), []byte("abc")}}}, false},
		{"short file ends implicitly", header{size: 1, truncate: 112}, false},
		{"backing file", header{size: 1, backingOffset: 512, backingSize: 8}, true},
		{"backing size only", header{size: 1, backingSize: 8}, true},
		{"external data bit", header{size: 1, incompat: incompatExternalData}, true},
		{"corrupt bit", header{size: 1, incompat: incompatCorrupt}, true},
		{"unknown incompatible bit", header{size: 1, incompat: 1 << 17}, true},
		{"aes encryption", header{size: 1, crypt: 1}, true},
		{"luks encryption", header{size: 1, crypt: 2}, true},
		{"external data extension", header{size: 1, exts: [][2]any{{uint32(extExternalData), []byte("/etc/shadow")}}}, true},
		{"data extension after another", header{size: 1, exts: [][2]any{{uint32(extFeatureNames), []byte("x")}, {uint32(extExternalData), []byte("/dev/sda")}}}, true},
		{"backing format extension", header{size: 1, exts: [][2]any{{uint32(extBackingFormat), []byte("raw")}}}, true},
		{"encryption extension", header{size: 1, exts: [][2]any{{uint32(extEncryption), make([]byte, 16)}}}, true},
		{"version 4", header{version: 4, size: 1}, true},
		{"cluster bits too small", header{clusterBits: 8, size: 1}, true},
		{"header length not aligned", header{size: 1, headerLen: 105}, true},
		{"header length too small", header{size: 1, headerLen: 96}, true},
		{"virtual size overflows int64", header{size: 1 << 63}, true},
		{"truncated v2 header", header{version: 2, size: 1, truncate: 40}, true},
		{"truncated v3 header", header{size: 1, truncate: 80}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info, err := ParseQCOW2Header(tc.h.bytes())
			if tc.wantErr {
				var inv *InvalidError
				if !errors.As(err, &inv) {
					t.Fatalf("got %+v, %v; want an *InvalidError", info, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseQCOW2Header: %v", err)
			}
			if info.Format != QCOW2 || uint64(info.VirtualSize) != tc.h.size {
				t.Fatalf("got %+v, want qcow2 of %d bytes", info, tc.h.size)
			}
		})
	}
}

func TestUnterminatedExtensions(t *testing.T) {
	// Fill the whole first cluster with feature-name extensions so no end
	// marker fits.
	b := header{clusterBits: 9, headerLen: 104}.bytes()
	for off := 104; off+8 <= len(b); off += 8 {
		binary.BigEndian.PutUint32(b[off:], extFeatureNames)
		binary.BigEndian.PutUint32(b[off+4:], 0)
	}
	if _, err := ParseQCOW2Header(b); err == nil {
		t.Fatal("unterminated extension list accepted")
	}
}

func TestProbeRaw(t *testing.T) {
	data := bytes.Repeat([]byte("not an image "), 1000)
	info, err := Probe(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if info.Format != Raw || info.VirtualSize != int64(len(data)) {
		t.Fatalf("got %+v", info)
	}
	// Leading bytes of formats that probing tools would take for something
	// else are refused (qemu-img makes the others in TestProbeQemuImgImages).
	for _, magic := range []string{"LUKS\xba\xbe\x00\x01", "conectix", "Bochs Virtual HD Image"} {
		b := append([]byte(magic), make([]byte, 512)...)
		var inv *InvalidError
		if _, err := Probe(bytes.NewReader(b), int64(len(b))); !errors.As(err, &inv) {
			t.Errorf("%q accepted as raw: %v", magic, err)
		}
	}
	// A name or a tiny file is no reason to think it is anything but raw.
	info, err = Probe(bytes.NewReader([]byte("QF")), 2)
	if err != nil || info.Format != Raw {
		t.Fatalf("2-byte file: %+v, %v", info, err)
	}
}

func TestProbeQemuImgImages(t *testing.T) {
	dir := t.TempDir()
	imageformattest.QemuImg(t, dir, "-f", "raw", "base.raw", "1M")
	for _, tc := range []struct {
		name    string
		args    []string
		wantErr bool
		size    int64
	}{
		{"plain qcow2", []string{"-f", "qcow2", "plain.qcow2", "3G"}, false, 3 << 30},
		{"compat 0.10 (v2)", []string{"-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M"}, false, 10 << 20},
		{"extended l2 + zstd", []string{"-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", "zstd.qcow2", "10M"}, false, 10 << 20},
		{"backing file", []string{"-f", "qcow2", "-b", "base.raw", "-F", "raw", "backed.qcow2"}, true, 0},
		{"external data file", []string{"-f", "qcow2", "-o", "data_file=data.raw", "ext.qcow2", "10M"}, true, 0},
		{"raw external data file", []string{"-f", "qcow2", "-o", "data_file=data2.raw,data_file_raw=on", "ext2.qcow2", "10M"}, true, 0},
		{"vmdk", []string{"-f", "vmdk", "x.vmdk", "10M"}, true, 0},
		{"vmdk descriptor", []string{"-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M"}, true, 0},
		{"vdi", []string{"-f", "vdi", "x.vdi", "10M"}, true, 0},
		{"vhdx", []string{"-f", "vhdx", "x.vhdx", "10M"}, true, 0},
		{"qed", []string{"-f", "qed", "x.qed", "10M"}, true, 0},
		{"parallels", []string{"-f", "parallels", "x.parallels", "10M"}, true, 0},
		{"luks encrypted", []string{"--object", "secret,id=sec0,data=123456", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "enc.qcow2", "10M"}, true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if tc.name == "backing file" {
				// qemu-img takes the size from the backing file.
				args = append(args, "1M")
			}
			b := imageformattest.QemuImg(t, dir, args...)
			info, err := Probe(bytes.NewReader(b), int64(len(b)))
			if tc.wantErr {
				var inv *InvalidError
				if !errors.As(err, &inv) {
					t.Fatalf("got %+v, %v; want refusal", info, err)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if info.Format != QCOW2 || info.VirtualSize != tc.size {
				t.Fatalf("got %+v, want qcow2 of %d bytes", info, tc.size)
			}
		})
	}
}

// FuzzParseQCOW2Header checks that no input panics the parser and that every
// accepted header really is free of references to other files, by reading
// the fields again independently of the parser.
func FuzzParseQCOW2Header(f *testing.F) {
	f.Add(header{size: 1 << 30}.bytes())
	f.Add(header{version: 2, size: 1}.bytes()[:512])
	f.Add(header{size: 1, exts: [][2]any{{uint32(extFeatureNames), []byte("x")}, {uint32(extExternalData), []byte("/x")}}}.bytes()[:1024])
	f.Add(header{size: 1, backingOffset: 512}.bytes()[:256])
	f.Add([]byte(qcow2Magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := ParseQCOW2Header(b)
		if err != nil {
			var inv *InvalidError
			if !errors.As(err, &inv) {
				t.Fatalf("error is not an *InvalidError: %v", err)
			}
			return
		}
		be := binary.BigEndian
		if info.Format != QCOW2 || info.VirtualSize < 0 {
			t.Fatalf("accepted with %+v", info)
		}
		if be.Uint64(b[8:]) != 0 || be.Uint32(b[16:]) != 0 {
			t.Fatal("accepted a backing file")
		}
		if be.Uint32(b[32:]) != 0 {
			t.Fatal("accepted encryption")
		}
		if v := be.Uint32(b[4:]); v == 3 && be.Uint64(b[72:])&(incompatExternalData|^uint64(incompatKnown)) != 0 {
			t.Fatal("accepted an external data file or unknown feature")
		}
		// No accepted header may contain a data-file extension in the
		// chain of extensions within the first cluster.
		off := uint64(v2HeaderLen)
		if be.Uint32(b[4:]) == 3 {
			off = uint64(be.Uint32(b[100:]))
		}
		for off+8 <= uint64(len(b)) {
			typ := be.Uint32(b[off:])
			if typ == extEnd {
				break
			}
			if typ == extExternalData || typ == extBackingFormat || typ == extEncryption {
				t.Fatalf("accepted extension %#x", typ)
			}
			off += 8 + (uint64(be.Uint32(b[off+4:]))+7)/8*8
		}
	})
}
