package main

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestProtectedNetsFlag(t *testing.T) {
	f := agentFlags{protectedNets: []string{"10.250.0.7/24", " 192.0.2.0/28"}}
	got, err := f.protectedPrefixes()
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.250.0.0/24"), netip.MustParsePrefix("192.0.2.0/28")}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v (masked)", got, want)
	}
	for _, bad := range []string{"10.0.0.1", "fd00::/64", "nonsense"} {
		f := agentFlags{protectedNets: []string{bad}}
		if _, err := f.protectedPrefixes(); err == nil || !strings.Contains(err.Error(), "--protected-nets") {
			t.Errorf("%q: got %v, want an error naming the flag", bad, err)
		}
	}
}
