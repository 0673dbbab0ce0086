package main

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestReservedCIDRFlag(t *testing.T) {
	cmd := newAPICommand()
	if err := cmd.ParseFlags([]string{"--reserved-cidr", "192.168.122.7/24", "--reserved-cidr", "10.250.0.0/24, 172.20.0.0/16"}); err != nil {
		t.Fatal(err)
	}
	in, err := cmd.Flags().GetStringSlice("reserved-cidr")
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseReservedCIDRs(in)
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("192.168.122.0/24"), netip.MustParsePrefix("10.250.0.0/24"), netip.MustParsePrefix("172.20.0.0/16")}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v (repeatable, comma separated, masked)", got, want)
	}
	if _, err := parseReservedCIDRs([]string{"10.0.0.1"}); err == nil || !strings.Contains(err.Error(), "--reserved-cidr") {
		t.Errorf("a bare address: %v, want an error naming the flag", err)
	}
}
