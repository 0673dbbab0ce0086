package webui

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func sample(at time.Time, cpuNs, rssKiB, rx, tx, rd, wr uint64) *minicloudv1.VMStats {
	return &minicloudv1.VMStats{Time: timestamppb.New(at), CpuTimeNs: cpuNs, Vcpus: 2, MemoryRssKib: rssKiB,
		Interfaces: []*minicloudv1.VMInterfaceStats{{RxBytes: rx, TxBytes: tx}},
		Disks:      []*minicloudv1.VMDiskStats{{ReadBytes: rd, WriteBytes: wr}}}
}

func TestStatsSeriesRates(t *testing.T) {
	var s statsSeries
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s.add(sample(t0, 10e9, 100<<10, 0, 0, 0, 0))
	if got := s.charts(); got != nil {
		t.Fatalf("one sample drew %v; rates need two", got)
	}
	// 5 s later: 5 s of CPU on 2 vCPUs is 50 %; 10 KiB/s of network, 2 MiB/s of disk.
	s.add(sample(t0.Add(5*time.Second), 15e9, 200<<10, 25<<10, 25<<10, 5<<20, 5<<20))
	c := s.charts()
	want := map[string]string{"CPU": "50.0 %", "Memory (RSS)": "200 MiB", "Network": "10.0 KiB/s", "Disk": "2.0 MiB/s"}
	for _, ch := range c {
		if want[ch.Title] != ch.Last {
			t.Errorf("%s = %q, want %q", ch.Title, ch.Last, want[ch.Title])
		}
	}
	// CPU is drawn against 100 %: 50 % is half way up the 30-high box.
	if c[0].Points != "0.0,15.0" {
		t.Errorf("CPU points %q", c[0].Points)
	}
	// A restarted domain (counters went back) adds no rate.
	s.add(sample(t0.Add(10*time.Second), 1e9, 100<<10, 0, 0, 0, 0))
	if n := len(s.cpu); n != 1 {
		t.Fatalf("a restart added a rate: %d", n)
	}
	// The series keep statsKept rates at most.
	at := t0.Add(10 * time.Second)
	for i := range statsKept + 10 {
		at = at.Add(5 * time.Second)
		s.add(sample(at, uint64(2e9+i*1e9), 100<<10, 0, 0, 0, 0))
	}
	if len(s.cpu) != statsKept || strings.Count(s.charts()[0].Points, " ") != statsKept-1 {
		t.Fatalf("kept %d rates, want %d", len(s.cpu), statsKept)
	}
}
