package main

import "testing"

// TestAllLoopback: the agent speaks plaintext only when every API replica
// it is given is on loopback (where the API listens without TLS).
func TestAllLoopback(t *testing.T) {
	for in, want := range map[string]bool{
		"127.0.0.1:8640":                true,
		"127.0.0.1:8640,[::1]:8641":     true,
		"localhost:8640,127.0.0.2:8640": true,
		"127.0.0.1:8640,10.0.0.5:8640":  false,
		"10.0.0.5:8640,10.0.0.6:8640":   false,
		"api.example:8640,127.0.0.1:1":  false,
	} {
		if got := allLoopback(in); got != want {
			t.Errorf("allLoopback(%q) = %v, want %v", in, got, want)
		}
	}
}
