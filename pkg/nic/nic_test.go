package nic

import (
	"net/netip"
	"strings"
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func TestTapName(t *testing.T) {
	for _, tc := range []struct {
		id   string
		nic  int
		want string
	}{
		{"1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809", 0, "mct1a2b3c4d0"},
		{"1A2B3C4D5E6F", 3, "mct1a2b3c4d3"},
		{"ab-cd", 1, "mctabcd1"},
		{"1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809", 12, "mct1a2b3c4d12"},
	} {
		got := TapName(tc.id, tc.nic)
		if got != tc.want {
			t.Errorf("TapName(%q, %d) = %q, want %q", tc.id, tc.nic, got, tc.want)
		}
		if len(got) > 15 {
			t.Errorf("TapName(%q, %d) = %q: longer than the kernel's 15 bytes", tc.id, tc.nic, got)
		}
		if !strings.HasPrefix(got, TapNamePrefix(tc.id)) || !strings.HasPrefix(got, TapPrefix) {
			t.Errorf("TapName(%q, %d) = %q does not start with its VM's prefix %q", tc.id, tc.nic, got, TapNamePrefix(tc.id))
		}
	}
}

const vmID = "1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809"

func addr() *minicloudv1.VMAddress {
	return &minicloudv1.VMAddress{Network: "net1", Bridge: "mc-0a1b2c3d", Ip: "10.88.0.5", PrefixLength: 24,
		Gateway: "10.88.0.1", Mac: "52:54:00:AA:bb:cc", Mtu: 1450}
}

func TestFromAddress(t *testing.T) {
	n, err := FromAddress(vmID, 1, addr())
	if err != nil {
		t.Fatal(err)
	}
	if n.Index != 1 || n.Network != "net1" || n.Bridge != "mc-0a1b2c3d" || n.MTU != 1450 || n.TapName != "mct1a2b3c4d1" {
		t.Errorf("NIC = %+v", n)
	}
	if n.Address != netip.MustParsePrefix("10.88.0.5/24") || n.IP() != netip.MustParseAddr("10.88.0.5") {
		t.Errorf("address %s / ip %s", n.Address, n.IP())
	}
	if n.Gateway != netip.MustParseAddr("10.88.0.1") || n.GatewayPrefix() != netip.MustParsePrefix("10.88.0.1/24") {
		t.Errorf("gateway %s / %s", n.Gateway, n.GatewayPrefix())
	}
	if n.MAC.String() != "52:54:00:aa:bb:cc" {
		t.Errorf("mac %s", n.MAC)
	}

	a := addr()
	a.Mtu, a.Gateway = 0, ""
	n, err = FromAddress(vmID, 0, a)
	if err != nil {
		t.Fatal(err)
	}
	if n.MTU != DefaultMTU {
		t.Errorf("MTU of a network without one = %d, want %d", n.MTU, DefaultMTU)
	}
	if n.Gateway.IsValid() {
		t.Errorf("gateway of a network without one = %s, want none", n.Gateway)
	}
}

func TestFromAddressRejects(t *testing.T) {
	for name, mutate := range map[string]func(*minicloudv1.VMAddress){
		"no ip":        func(a *minicloudv1.VMAddress) { a.Ip = "" },
		"bad ip":       func(a *minicloudv1.VMAddress) { a.Ip = "10.88.0.300" },
		"zero prefix":  func(a *minicloudv1.VMAddress) { a.PrefixLength = 0 },
		"long prefix":  func(a *minicloudv1.VMAddress) { a.PrefixLength = 33 },
		"bad gateway":  func(a *minicloudv1.VMAddress) { a.Gateway = "gw" },
		"no mac":       func(a *minicloudv1.VMAddress) { a.Mac = "" },
		"bad mac":      func(a *minicloudv1.VMAddress) { a.Mac = "52:54:00:zz:00:01" },
		"negative mtu": func(a *minicloudv1.VMAddress) { a.Mtu = -1 },
	} {
		a := addr()
		mutate(a)
		if n, err := FromAddress(vmID, 0, a); err == nil {
			t.Errorf("%s: FromAddress = %+v, want an error", name, n)
		}
	}
}

func TestFromVM(t *testing.T) {
	second := addr()
	second.Network, second.Ip = "net2", "10.88.0.6"
	vm := &minicloudv1.VM{
		Meta:   &minicloudv1.ObjectMeta{Id: vmID},
		Status: &minicloudv1.VMStatus{Addresses: []*minicloudv1.VMAddress{addr(), second}},
	}
	nics, err := FromVM(vm)
	if err != nil {
		t.Fatal(err)
	}
	if len(nics) != 2 || nics[0].TapName != "mct1a2b3c4d0" || nics[1].TapName != "mct1a2b3c4d1" || nics[1].Network != "net2" {
		t.Errorf("NICs = %+v", nics)
	}
	if nics, err := FromVM(&minicloudv1.VM{Meta: &minicloudv1.ObjectMeta{Id: vmID}}); err != nil || len(nics) != 0 {
		t.Errorf("VM without addresses: %v, %v", nics, err)
	}
	second.Mac = "x"
	if _, err := FromVM(vm); err == nil || !strings.Contains(err.Error(), "net2") {
		t.Errorf("bad second address: %v, want an error naming its network", err)
	}
}
