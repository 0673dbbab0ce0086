package main

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// oneByteReader hands out its input a byte at a time, as a terminal in raw
// mode does for typed keys.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) { return o.r.Read(p[:1]) }

func TestCopyConsoleInputStopsAtCtrlBracket(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in       io.Reader
		write    bool
		sent     string
		detached bool
	}{
		{"escape mid-chunk", strings.NewReader("ls\r\x1dnot sent"), true, "ls\r", true},
		{"escape typed alone", oneByteReader{strings.NewReader("ab\x1dc")}, true, "ab", true},
		{"end of input detaches", strings.NewReader("echo hi\r"), true, "echo hi\r", false},
		{"a watcher sends nothing", strings.NewReader("typed\x1d"), false, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var sent bytes.Buffer
			got := copyConsoleInput(tc.in, tc.write, func(p []byte) error { sent.Write(p); return nil })
			if got != tc.detached || sent.String() != tc.sent {
				t.Errorf("detached %v, sent %q; want %v, %q", got, sent.String(), tc.detached, tc.sent)
			}
		})
	}
}

func TestStatsRates(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	prev := &minicloudv1.VMStats{Time: timestamppb.New(t0), CpuTimeNs: 1e9, Vcpus: 2, MemoryActualKib: 256 << 10,
		Disks:      []*minicloudv1.VMDiskStats{{Device: "vda", ReadBytes: 0, WriteBytes: 1 << 20, WriteOps: 10}},
		Interfaces: []*minicloudv1.VMInterfaceStats{{Device: "tap0", RxBytes: 1000, RxPackets: 10}}}
	cur := &minicloudv1.VMStats{Time: timestamppb.New(t0.Add(2 * time.Second)), CpuTimeNs: 2e9, Vcpus: 2, MemoryActualKib: 256 << 10,
		Disks:      []*minicloudv1.VMDiskStats{{Device: "vda", ReadBytes: 4 << 20, WriteBytes: 1 << 20, WriteOps: 10}},
		Interfaces: []*minicloudv1.VMInterfaceStats{{Device: "tap0", RxBytes: 3048, RxPackets: 30}}}
	var b bytes.Buffer
	if err := writeStatsRates(&b, "web1", prev, cur); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	// 1 s of CPU in 2 s: 50% of one vCPU; 4 MiB read in 2 s: 2 MiB/s;
	// 2048 bytes and 20 packets received in 2 s.
	for _, want := range []string{"50.0% of one vCPU (2 vCPUs)", "2 MiB/s", "1 KiB/s", "10.0", "256 MiB given"} {
		if !strings.Contains(out, want) {
			t.Errorf("rates lack %q:\n%s", want, out)
		}
	}
	// A restart (counters went down) counts from zero, never negative.
	restarted := &minicloudv1.VMStats{Time: timestamppb.New(t0.Add(4 * time.Second)), CpuTimeNs: 5e8, Vcpus: 2}
	b.Reset()
	if err := writeStatsRates(&b, "web1", cur, restarted); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "25.0% of one vCPU") {
		t.Errorf("after a restart:\n%s", b.String())
	}
}
