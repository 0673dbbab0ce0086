// Package network is the agent's port to host networking: the bridge of each
// guest network and one filtered port (a tap, or an adopted veth end) per VM
// NIC. The reconcile loop depends on the Manager interface; agent/network/linux
// implements it with netlink and nftables, and networktest holds the
// conformance suite every implementation must pass.
package network

import (
	"context"
	"net"
	"net/netip"
	"regexp"
	"strings"

	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/nic"
)

// MetadataAddr is the link-local address of the metadata service. Every
// minicloud bridge carries it as a /32 so the metadata service can listen on
// it, and no guest may use it as a source address.
var MetadataAddr = netip.MustParseAddr("169.254.169.254")

// BridgeSpec is the desired state of one guest network's bridge on a host.
type BridgeSpec struct {
	// Name is the Linux bridge name (Network.bridge, "mc-" + 8 hex).
	Name string
	// GatewayCIDR is the gateway address with the network's prefix length,
	// e.g. 10.88.0.1/24; the network's CIDR is GatewayCIDR.Masked().
	GatewayCIDR netip.Prefix
	// MTU of the bridge; 0 means 1500.
	MTU int
	// NAT masquerades traffic from the network leaving through any other
	// interface.
	NAT bool
	// Tunnel, when set, spans the network over other hosts with a VXLAN
	// device on the bridge; nil keeps the network on this host only.
	Tunnel *TunnelSpec
}

// VXLANOverhead is what VXLAN over IPv4 adds to every frame: outer IPv4 (20),
// UDP (8), VXLAN (8) and the inner Ethernet header (14). A tunnelled
// network's MTU must be at most the underlay's MTU minus this.
const VXLANOverhead = 50

// MaxVNI is the largest 24-bit VXLAN network identifier.
const MaxVNI = 1<<24 - 1

// TunnelSpec is a network's VXLAN segment on this host. Remote ports are
// reached by static forwarding entries (Manager.SetRemotePorts), never by
// multicast or learning, as flannel's vxlan backend and Neutron's
// l2population do.
type TunnelSpec struct {
	// VNI is the network's VXLAN segment id, 1-MaxVNI, the same on every host.
	VNI uint32
	// Local is this host's underlay (VTEP) address.
	Local netip.Addr
}

// RemotePort is a guest port of the network on another host.
type RemotePort struct {
	MAC net.HardwareAddr
	IP  netip.Addr
	// VTEP is the underlay address of the port's host.
	VTEP netip.Addr
}

// PortSpec is the desired state of one guest NIC's host-side port.
type PortSpec struct {
	// VMID owns the port; it is recorded on the link so ListPorts can report it.
	VMID string
	// TapName is the host interface name (nic.TapName).
	TapName string
	// Bridge is the BridgeSpec.Name the port joins.
	Bridge string
	// MAC is the guest's MAC address: the only source MAC allowed from the port.
	MAC net.HardwareAddr
	// IP is the guest's IPv4 address: the only source IP allowed from the port.
	IP netip.Addr
	// MTU of the port; 0 means the bridge's MTU.
	MTU int
	// Existing adopts an interface that already exists (the host end of a veth
	// whose peer sits in a network namespace) instead of creating a tap, so
	// namespace test guests get exactly the filtering a VM gets.
	Existing bool
}

// PortForward is a DNAT of a host port to a guest (minicloud vm expose).
type PortForward struct {
	// VMID owns the forward; it is recorded with it so ListPortForwards
	// can report it, and an agent removes only forwards of its own VMs.
	VMID string
	// Protocol is "tcp" or "udp".
	Protocol  string
	HostPort  uint16
	GuestIP   netip.Addr
	GuestPort uint16
}

// Validate checks a PortForward before anything is programmed.
func (f PortForward) Validate() error {
	if f.VMID == "" || len(f.VMID) > 128 {
		return errdefs.Invalid("port forward %d/%s: VM id %q must be 1-128 bytes", f.HostPort, f.Protocol, f.VMID)
	}
	if err := ValidateProtocol(f.Protocol); err != nil {
		return err
	}
	if f.HostPort == 0 || f.GuestPort == 0 {
		return errdefs.Invalid("port forward of VM %s: ports must be 1-65535 (host %d, guest %d)", f.VMID, f.HostPort, f.GuestPort)
	}
	if !f.GuestIP.Is4() || f.GuestIP.IsUnspecified() || f.GuestIP.IsMulticast() || f.GuestIP.IsLoopback() || f.GuestIP == MetadataAddr {
		return errdefs.Invalid("port forward %d/%s of VM %s: guest IP %q is not a usable IPv4 unicast address", f.HostPort, f.Protocol, f.VMID, f.GuestIP)
	}
	return nil
}

// ValidateProtocol accepts "tcp" and "udp".
func ValidateProtocol(p string) error {
	if p != "tcp" && p != "udp" {
		return errdefs.Invalid("protocol %q: want tcp or udp", p)
	}
	return nil
}

// Manager creates and removes bridges and filtered ports on one host.
//
// Every method is idempotent and measures before it acts: calling it twice
// changes nothing the second time. A port's filter is installed before the
// port joins its bridge or comes up, so a port never forwards unfiltered
// frames. Implementations never flush their filters on start: a new Manager
// over existing kernel state keeps every filter in place and converges.
type Manager interface {
	// EnsureBridge creates the bridge if missing and converges its addresses
	// (gateway and MetadataAddr/32), MTU, NAT and host-protection rules.
	EnsureBridge(ctx context.Context, spec BridgeSpec) error
	// DeleteBridge removes the bridge and its rules; it is a no-op when absent.
	// Ports still attached are deleted with it.
	DeleteBridge(ctx context.Context, name string) error
	// ListBridges reports the minicloud bridges present on the host.
	ListBridges(ctx context.Context) ([]BridgeSpec, error)

	// SetRemotePorts converges the tunnel of the bridge to reach exactly
	// these ports of other hosts: a forwarding entry per port MAC towards its
	// VTEP, one broadcast (head-end replication) entry per VTEP that has a
	// port, a neighbour entry per port IP so ARP is answered locally, and the
	// tunnel's ingress allowlist. Frames from the tunnel whose source is not
	// one of these ports are dropped. The bridge must have a Tunnel.
	SetRemotePorts(ctx context.Context, bridge string, ports []RemotePort) error

	// EnsurePort creates the tap (persistent, owned by root) or adopts the
	// existing interface, installs its anti-spoofing filter, then attaches it
	// to its bridge, sets its MTU and brings it up. The bridge must exist.
	EnsurePort(ctx context.Context, spec PortSpec) error
	// DeletePort removes the port's filter and its interface; it is a no-op
	// when both are absent.
	DeletePort(ctx context.Context, tapName string) error
	// ListPorts reports every port minicloud created or adopted on the host
	// (including half-created ones whose filter is missing, with a zero IP),
	// for garbage collection.
	ListPorts(ctx context.Context) ([]PortSpec, error)

	// EnsurePortForward makes TCP or UDP traffic that reaches the host on
	// HostPort (to any of its own addresses, from any interface but a
	// guest bridge, and from the host itself to a non-loopback address)
	// go to GuestIP:GuestPort, and lets the guest's replies out (they pass
	// the guest-isolation rules as replies of that connection only). A
	// host port forwarded to another VM on this host is ALREADY_EXISTS;
	// the same VM's forward with another target is replaced atomically.
	EnsurePortForward(ctx context.Context, f PortForward) error
	// DeletePortForward removes the forward of a host port; a no-op when
	// absent.
	DeletePortForward(ctx context.Context, protocol string, hostPort uint16) error
	// ListPortForwards reports every forward on the host, of any VM.
	ListPortForwards(ctx context.Context) ([]PortForward, error)

	// Sync converges the host to exactly the given bridges and ports: it
	// ensures each one and deletes every other minicloud port and bridge. It
	// never removes a wanted port's filter, not even for an instant.
	Sync(ctx context.Context, bridges []BridgeSpec, ports []PortSpec) error
}

// PortPrefix starts every port name (nic.TapName makes them). The host
// recognises guest ports by it, so a port with any other name would escape
// the anti-spoofing filter: PortSpec.Validate refuses such names.
const PortPrefix = nic.TapPrefix

// maxIfName is IFNAMSIZ minus the terminating NUL.
const maxIfName = 15

var ifNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// ValidateIfName checks a Linux interface name.
func ValidateIfName(what, name string) error {
	if name == "" || len(name) > maxIfName || !ifNameRE.MatchString(name) {
		return errdefs.Invalid("%s name %q: want 1-%d characters of [A-Za-z0-9_.-]", what, name, maxIfName)
	}
	return nil
}

// Validate checks a BridgeSpec before anything is created.
func (s BridgeSpec) Validate() error {
	if err := ValidateIfName("bridge", s.Name); err != nil {
		return err
	}
	if !s.GatewayCIDR.IsValid() || !s.GatewayCIDR.Addr().Is4() {
		return errdefs.Invalid("bridge %s: gateway %q is not an IPv4 address with prefix length", s.Name, s.GatewayCIDR)
	}
	if s.GatewayCIDR.Bits() < 8 || s.GatewayCIDR.Bits() > 30 {
		return errdefs.Invalid("bridge %s: prefix length /%d out of range 8-30", s.Name, s.GatewayCIDR.Bits())
	}
	gw := s.GatewayCIDR.Addr()
	if gw == s.GatewayCIDR.Masked().Addr() {
		return errdefs.Invalid("bridge %s: gateway %s is the network address", s.Name, gw)
	}
	if s.MTU != 0 && (s.MTU < 576 || s.MTU > 9000) {
		return errdefs.Invalid("bridge %s: MTU %d out of range 576-9000", s.Name, s.MTU)
	}
	if t := s.Tunnel; t != nil {
		if t.VNI == 0 || t.VNI > MaxVNI {
			return errdefs.Invalid("bridge %s: VNI %d out of range 1-%d", s.Name, t.VNI, MaxVNI)
		}
		if !t.Local.Is4() || t.Local.IsUnspecified() || t.Local.IsLoopback() || t.Local.IsMulticast() {
			return errdefs.Invalid("bridge %s: tunnel address %q is not a usable IPv4 unicast address", s.Name, t.Local)
		}
	}
	return nil
}

// Validate checks a RemotePort.
func (p RemotePort) Validate() error {
	if len(p.MAC) != 6 || p.MAC[0]&1 == 1 || isZero(p.MAC) {
		return errdefs.Invalid("remote port: MAC %q is not a unicast Ethernet address", p.MAC)
	}
	if !p.IP.Is4() || p.IP.IsUnspecified() || p.IP.IsMulticast() || p.IP.IsLoopback() || p.IP == MetadataAddr {
		return errdefs.Invalid("remote port %s: IP %q is not a usable IPv4 unicast address", p.MAC, p.IP)
	}
	if !p.VTEP.Is4() || p.VTEP.IsUnspecified() || p.VTEP.IsLoopback() || p.VTEP.IsMulticast() {
		return errdefs.Invalid("remote port %s: VTEP %q is not a usable IPv4 unicast address", p.MAC, p.VTEP)
	}
	return nil
}

// Validate checks a PortSpec before anything is created.
func (s PortSpec) Validate() error {
	if err := ValidateIfName("port", s.TapName); err != nil {
		return err
	}
	if !strings.HasPrefix(s.TapName, PortPrefix) || len(s.TapName) == len(PortPrefix) {
		return errdefs.Invalid("port name %q: must start with %q (the host filters ports by this prefix)", s.TapName, PortPrefix)
	}
	if err := ValidateIfName("bridge", s.Bridge); err != nil {
		return err
	}
	if s.VMID == "" {
		return errdefs.Invalid("port %s: VM id is empty", s.TapName)
	}
	if len(s.MAC) != 6 || s.MAC[0]&1 == 1 || isZero(s.MAC) {
		return errdefs.Invalid("port %s: MAC %q is not a unicast Ethernet address", s.TapName, s.MAC)
	}
	if !s.IP.Is4() || s.IP.IsUnspecified() || s.IP.IsMulticast() || s.IP.IsLoopback() || s.IP == MetadataAddr {
		return errdefs.Invalid("port %s: IP %q is not a usable IPv4 unicast address", s.TapName, s.IP)
	}
	if s.MTU != 0 && (s.MTU < 576 || s.MTU > 9000) {
		return errdefs.Invalid("port %s: MTU %d out of range 576-9000", s.TapName, s.MTU)
	}
	return nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// CheckGuestIP refuses a guest address outside the bridge's network, or one
// the guest may not have there: the gateway, the network or broadcast address.
func (s BridgeSpec) CheckGuestIP(ip netip.Addr) error {
	n := s.GatewayCIDR.Masked()
	switch {
	case !n.Contains(ip):
		return errdefs.Invalid("IP %s is outside network %s of bridge %s", ip, n, s.Name)
	case ip == s.GatewayCIDR.Addr():
		return errdefs.Invalid("IP %s is the gateway of bridge %s", ip, s.Name)
	case ip == n.Addr() || ip == lastAddr(n):
		return errdefs.Invalid("IP %s is the network or broadcast address of %s", ip, n)
	}
	return nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= 1<<(32-p.Bits()) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
