package server_test

import (
	"fmt"
	"net/netip"
	"testing"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestNetworkRefusesTheMachinesOwnRanges: a network may overlap neither a
// range the operator reserved (--reserved-cidr) nor the address of a
// registered host — agent or tunnel — and the store is left untouched.
func TestNetworkRefusesTheMachinesOwnRanges(t *testing.T) {
	e := newEnv(t)
	e.stop()
	e.reserved = []netip.Prefix{netip.MustParsePrefix("192.168.122.0/24"), netip.MustParsePrefix("172.20.0.0/16")}
	e.start()
	_, err := e.hosts.RegisterHost(ctx(t), &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: "h1"}, Address: "10.50.0.7:8642", TunnelIp: "10.60.1.9",
		Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 16384, DiskGib: 100}, Hypervisors: []string{"tcg"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	before := e.dump(t)
	for _, tc := range []struct {
		cidr, want string
		code       codes.Code
	}{
		{"192.168.122.0/24", "overlaps 192.168.122.0/24, reserved by the operator", codes.InvalidArgument},
		{"192.168.0.0/16", "overlaps 192.168.122.0/24, reserved by the operator", codes.InvalidArgument},
		{"172.20.5.0/24", "overlaps 172.20.0.0/16, reserved", codes.InvalidArgument},
		{"10.50.0.0/24", "contains 10.50.0.7, the agent address of host h1", codes.FailedPrecondition},
		{"10.60.0.0/16", "contains 10.60.1.9, the tunnel (underlay) address of host h1", codes.FailedPrecondition},
	} {
		_, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "n", Cidr: tc.cidr})
		wantCode(t, err, tc.code, tc.want)
	}
	e.wantUnchanged(t, before)
	// Next to them is fine.
	for i, cidr := range []string{"192.168.123.0/24", "10.50.1.0/24", "10.61.0.0/16"} {
		if _, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: fmt.Sprintf("n%d", i), Cidr: cidr}); err != nil {
			t.Errorf("%s: %v", cidr, err)
		}
	}
}
