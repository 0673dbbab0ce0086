package main

import (
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 30; i++ {
		d = append(d, time.Duration(i)*time.Second)
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{0.5, 15 * time.Second}, {0.9, 27 * time.Second}, {0.99, 30 * time.Second}, {1, 30 * time.Second}, {0, time.Second}} {
		if got := pct(d, c.p); got != c.want {
			t.Errorf("p%v of 1..30 s = %s, want %s", c.p*100, got, c.want)
		}
	}
	if pct(nil, 0.5) != 0 {
		t.Error("percentile of nothing is not 0")
	}
}

// TestRender: both batches and both network rows reach the table, with
// the per-host spread and the VXLAN proof column.
func TestRender(t *testing.T) {
	b := func(host string, hosts map[string]int) *batch {
		return &batch{round: 1, host: host, n: 3, perHost: hosts, latency: []time.Duration{time.Second, 2 * time.Second, 3 * time.Second}, total: 4 * time.Second, deleteIn: time.Second}
	}
	rtt := []time.Duration{100 * time.Microsecond, 150 * time.Microsecond, 300 * time.Microsecond}
	out := render(options{n: 3, rounds: 1, pings: 3, tcpTime: time.Second}, 7*time.Second,
		[]*batch{b("", map[string]int{"host1": 1, "host2": 1, "host3": 1}), b("host1", map[string]int{"host1": 3})},
		[]netResult{{what: "same host", mtu: 1450, rtt: rtt, mbits: 9000}, {what: "across hosts", mtu: 1450, rtt: rtt, mbits: 7000, vxlanBytes: 875_000_000}},
		time.Minute)
	for _, want := range []string{
		"| 1 | 3 at once, spread by the scheduler over 3 hosts | host1 1, host2 1, host3 1 | 2.0 s | 3.0 s | 3.0 s | **4.0 s** |",
		"| 1 | 3 at once, all on host1 (`target_host`) | host1 3 |",
		"| same host | 1450 | 100 µs | 150 µs | 300 µs | 9000 Mbit/s | 0.0 MB |",
		"| across hosts | 1450 | 100 µs | 150 µs | 300 µs | 7000 Mbit/s | 875.0 MB |",
		"load average",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("render lacks %q:\n%s", want, out)
		}
	}
}
