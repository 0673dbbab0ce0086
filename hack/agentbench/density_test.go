package main

import (
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// snapshot is the histogram h as a scrape would show it.
func snapshot(t *testing.T, h prometheus.Histogram) *dto.Histogram {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram()
}

// TestHistogramDelta: quantiles come from the observations made between
// two scrapes only, interpolated within their bucket.
func TestHistogramDelta(t *testing.T) {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "x", Buckets: []float64{0.001, 0.002, 0.004, 0.008}})
	for range 50 {
		h.Observe(0.0075) // before: slow passes that must not count
	}
	from := snapshot(t, h)
	for range 99 {
		h.Observe(0.0015) // in (0.001, 0.002]
	}
	h.Observe(0.0035) // in (0.002, 0.004]
	p := histogramDelta(from, snapshot(t, h))
	if p.count != 100 {
		t.Fatalf("count %d, want 100", p.count)
	}
	// Rank 50 of 99 in (1 ms, 2 ms]: 1 + 50/99 ms = 1.50505 ms.
	if want := 1505050 * time.Nanosecond; p.p50 < want-time.Microsecond || p.p50 > want+time.Microsecond {
		t.Fatalf("p50 %v, want %v", p.p50, want)
	}
	if want := 2 * time.Millisecond; p.p99 != want {
		t.Fatalf("p99 %v, want %v (rank 99 is the last of the first bucket)", p.p99, want)
	}
	if all := histogramDelta(nil, snapshot(t, h)); all.count != 150 || all.p99 <= 4*time.Millisecond {
		t.Fatalf("from nil: %+v, want all 150 passes, the slow ones in p99", all)
	}
	if none := histogramDelta(from, from); none.count != 0 || none.p50 != 0 {
		t.Fatalf("no new passes: %+v", none)
	}
}

func TestReadProc(t *testing.T) {
	p, err := readProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if p.rss <= 0 || p.cpu < 0 {
		t.Fatalf("own process: %+v", p)
	}
}
