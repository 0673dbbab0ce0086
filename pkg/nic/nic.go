// Package nic is the one home of a VM's network interface as a host wires
// it: parsed once from the VM's addresses (VMStatus.addresses, written by the
// API when it allocates them) into typed values that the agent, the metadata
// service and the hypervisor adapter all use, with the one MTU default and
// the one tap naming rule.
package nic

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// DefaultMTU is a NIC's MTU when its network sets none.
const DefaultMTU = 1500

// TapPrefix starts the host-side name of every guest port. The host
// recognises guest ports by it (its nftables rules match on it), so a port
// with any other name would escape the anti-spoofing filter.
const TapPrefix = "mct"

// NIC is one network interface of a VM.
type NIC struct {
	// Index is the NIC's position in the guest (0 is the primary one).
	Index int
	// Network is the network's name; Bridge the host bridge its tap joins.
	// Together with the address, the bridge identifies the guest to the
	// metadata service.
	Network string
	Bridge  string
	MAC     net.HardwareAddr
	// Address is the guest's IPv4 address with the subnet's prefix length.
	Address netip.Prefix
	// Gateway is the network's gateway; the zero Addr when it has none.
	Gateway netip.Addr
	// MTU is never 0: DefaultMTU when the network sets none.
	MTU int
	// TapName is the host interface the NIC is plugged into (TapName()).
	TapName string
}

// IP is the guest's address without the prefix length.
func (n NIC) IP() netip.Addr { return n.Address.Addr() }

// GatewayPrefix is the gateway with the subnet's prefix length: the address
// the host bridge carries, e.g. 10.88.0.1/24.
func (n NIC) GatewayPrefix() netip.Prefix { return netip.PrefixFrom(n.Gateway, n.Address.Bits()) }

// DHCP reports whether the host's DHCP server answers this NIC: it does for
// every IPv4 NIC whose network has a gateway (the bridge address the server
// speaks from; agent/guestservices/dhcpserver refuses a lease without one). Every
// renderer of network config for cloud-init asks this one question, so the
// OpenStack tree, the config drives and NoCloud's network-config agree.
func (n NIC) DHCP() bool {
	return n.Address.Addr().Is4() && n.Gateway.Is4()
}

// FromVM parses every address of vm, in guest order. A VM whose addresses
// are not allocated yet has no NICs.
func FromVM(vm *minicloudv1.VM) ([]NIC, error) {
	var nics []NIC
	for i, a := range vm.GetStatus().GetAddresses() {
		n, err := FromAddress(vm.GetMeta().GetId(), i, a)
		if err != nil {
			return nil, fmt.Errorf("vm %s: address %d (network %s): %w", vm.GetMeta().GetId(), i, a.GetNetwork(), err)
		}
		nics = append(nics, n)
	}
	return nics, nil
}

// FromAddress parses address index of VM vmID. The gateway may be empty;
// everything else must be well formed.
func FromAddress(vmID string, index int, a *minicloudv1.VMAddress) (NIC, error) {
	n := NIC{Index: index, Network: a.GetNetwork(), Bridge: a.GetBridge(), MTU: int(a.GetMtu()), TapName: TapName(vmID, index)}
	ip, err := netip.ParseAddr(a.GetIp())
	if err != nil {
		return n, fmt.Errorf("ip %q: %w", a.GetIp(), err)
	}
	bits := int(a.GetPrefixLength())
	if bits <= 0 || bits > ip.BitLen() {
		return n, fmt.Errorf("prefix length %d of %s out of range", bits, ip)
	}
	n.Address = netip.PrefixFrom(ip, bits)
	if g := a.GetGateway(); g != "" {
		if n.Gateway, err = netip.ParseAddr(g); err != nil {
			return n, fmt.Errorf("gateway %q: %w", g, err)
		}
	}
	if n.MAC, err = net.ParseMAC(a.GetMac()); err != nil {
		return n, fmt.Errorf("mac %q: %w", a.GetMac(), err)
	}
	if n.MTU < 0 {
		return n, fmt.Errorf("mtu %d is negative", n.MTU)
	}
	if n.MTU == 0 {
		n.MTU = DefaultMTU
	}
	return n, nil
}

// TapName is the host port of NIC index of a VM: TapPrefix, the first 8 hex
// digits of the VM id (dashes removed, lower case) and the index, e.g.
// "mct1a2b3c4d0". It is stable across agent restarts, so the agent finds its
// taps again, and fits the kernel's 15-byte interface names.
func TapName(vmID string, index int) string { return TapNamePrefix(vmID) + strconv.Itoa(index) }

// TapNamePrefix is what every tap of a VM starts with, so a VM's ports can
// be found (and removed) without knowing how many NICs it had.
func TapNamePrefix(vmID string) string {
	hex := strings.ToLower(strings.ReplaceAll(vmID, "-", ""))
	if len(hex) > 8 {
		hex = hex[:8]
	}
	return TapPrefix + hex
}
