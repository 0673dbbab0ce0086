package metadata

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Peer is where a connection came from, as the host observed it (never as
// the guest claims it).
type Peer struct {
	// Interface is the host interface (bridge) the connection arrived on.
	Interface string
	Addr      netip.Addr
	// MAC is the source's link-layer address when the resolver knows it up
	// front. The bridge resolver leaves it nil and looks the MAC up in the
	// host's neighbour table only for addresses that map to an instance.
	// Resolvers without a link layer (loopback benchmark, unit tests) leave
	// it nil, and then no MAC check is made.
	MAC net.HardwareAddr
}

// PeerResolver tells where an accepted connection came from.
type PeerResolver interface {
	ResolvePeer(c net.Conn) (Peer, error)
}

// PeerResolverFunc adapts a function to PeerResolver.
type PeerResolverFunc func(c net.Conn) (Peer, error)

// ResolvePeer calls f.
func (f PeerResolverFunc) ResolvePeer(c net.Conn) (Peer, error) { return f(c) }

// NeighbourTable answers which MAC the host has learnt for an address on an
// interface.
type NeighbourTable interface {
	LookupMAC(iface string, ip netip.Addr) (net.HardwareAddr, error)
}

// errNoNeighbour means the host holds no usable link-layer address for the
// peer; the request is refused (fail closed).
var errNoNeighbour = errors.New("no neighbour entry")

// NetlinkNeighbours reads the kernel's neighbour (ARP) table over netlink.
// By the time a TCP connection is accepted the kernel has resolved the
// peer to answer its SYN, so a missing entry means something is off.
type NetlinkNeighbours struct{}

// LookupMAC returns the lladdr of ip on iface from a valid (not FAILED or
// INCOMPLETE) neighbour entry.
func (NetlinkNeighbours) LookupMAC(iface string, ip netip.Addr) (net.HardwareAddr, error) {
	link, err := netlink.LinkByName(iface)
	if err != nil {
		return nil, fmt.Errorf("neighbour lookup on %s: %w", iface, err)
	}
	family := netlink.FAMILY_V4
	if ip.Is6() && !ip.Is4In6() {
		family = netlink.FAMILY_V6
	}
	neighs, err := netlink.NeighList(link.Attrs().Index, family)
	if err != nil {
		return nil, fmt.Errorf("neighbour list on %s: %w", iface, err)
	}
	target := ip.Unmap()
	for _, n := range neighs {
		a, ok := netip.AddrFromSlice(n.IP)
		if !ok || a.Unmap() != target {
			continue
		}
		if n.State&(unix.NUD_FAILED|unix.NUD_INCOMPLETE) != 0 || len(n.HardwareAddr) == 0 {
			continue
		}
		return n.HardwareAddr, nil
	}
	return nil, fmt.Errorf("%s on %s: %w", target, iface, errNoNeighbour)
}

// macResolver is implemented by resolvers that learn the source MAC
// separately: the server asks only once the address maps to an instance
// and that instance is within its rate limit, so a guest opening
// connections cannot make the host dump its neighbour table at will.
type macResolver interface {
	resolveMAC(p Peer) (net.HardwareAddr, error)
}

// bridgeResolver identifies connections accepted on a listener bound to one
// bridge: the bridge is the listener's, the address the TCP peer's and the
// MAC the neighbour table's.
type bridgeResolver struct {
	iface string
	neigh NeighbourTable
}

func (r bridgeResolver) ResolvePeer(c net.Conn) (Peer, error) {
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return Peer{}, fmt.Errorf("peer address %s: %w", c.RemoteAddr(), err)
	}
	return Peer{Interface: r.iface, Addr: ap.Addr().Unmap()}, nil
}

func (r bridgeResolver) resolveMAC(p Peer) (net.HardwareAddr, error) {
	return r.neigh.LookupMAC(r.iface, p.Addr)
}

// identify maps a peer to its instance's current entry: the address must
// belong to an instance on that very bridge, and mac (when known: nil only
// for resolvers without a link layer) must be that interface's.
func (d *Directory) identify(p Peer, mac net.HardwareAddr) (*entry, error) {
	e := d.lookup(p.Interface, p.Addr)
	if e == nil {
		return nil, fmt.Errorf("no instance has %s on %s", p.Addr, p.Interface)
	}
	if err := e.checkMAC(p, mac); err != nil {
		return nil, err
	}
	return e, nil
}

// checkMAC says whether mac (when known) is that of e's interface with p's
// address on p's bridge.
func (e *entry) checkMAC(p Peer, mac net.HardwareAddr) error {
	if mac == nil {
		return nil
	}
	for _, nic := range e.inst.Interfaces {
		if nic.Bridge == p.Interface && nic.Address.Addr() == p.Addr {
			if bytes.Equal(nic.MAC, mac) {
				return nil
			}
			return fmt.Errorf("%s on %s comes from MAC %s, instance %s has %s", p.Addr, p.Interface, mac, e.inst.ID, nic.MAC)
		}
	}
	return fmt.Errorf("no interface for %s on %s", p.Addr, p.Interface)
}
