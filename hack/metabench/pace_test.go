package main

import (
	"testing"
	"time"
)

// TestPacerNeverEarly: latency in the open-loop runs counts from the
// scheduled time, so the pacing must never send before it (which would
// understate both servers' latency), whether the wait is below the runtime
// timer's millisecond, above it, or already over.
func TestPacerNeverEarly(t *testing.T) {
	p, err := newPacer()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, d := range []time.Duration{-time.Millisecond, 0, 50 * time.Microsecond, 300 * time.Microsecond, 1500 * time.Microsecond, 2500 * time.Microsecond, 7 * time.Millisecond} {
		for i := 0; i < 5; i++ {
			at := time.Now().Add(d)
			if err := p.sleepUntil(at); err != nil {
				t.Fatal(err)
			}
			if now := time.Now(); now.Before(at) {
				t.Fatalf("sleepUntil(now+%s) returned %s early", d, at.Sub(now))
			}
		}
	}
}
