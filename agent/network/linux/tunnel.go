package linux

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// A tunnelled network has one VXLAN device per host, a port of the
// network's bridge. It is built as flannel's vxlan backend and Neutron's
// l2population build theirs: no multicast group and no learning; the agent
// programs, from the API's stream of remote ports, a static forwarding entry
// per remote MAC towards its host (VTEP), one all-zero entry per host that
// has a port on the network (head-end replication of broadcasts, only to
// those hosts) and a permanent neighbour entry per remote IP, which the
// device's ARP proxy answers from, so ARP never crosses the underlay.

// TunnelPrefix starts every VXLAN device name; the ruleset recognises tunnel
// ports by it (like network.PortPrefix for guest ports).
const TunnelPrefix = "mcv"

// VXLANPort is the IANA VXLAN UDP port.
const VXLANPort = 4789

const tunnelAlias = "minicloud:tunnel"

// TunnelName is the VXLAN device of bridge: TunnelPrefix and 8 hex digits of
// a hash of the bridge name, so any bridge name (up to 15 characters) gets a
// valid, stable device name.
func TunnelName(bridge string) string {
	h := fnv.New32a()
	h.Write([]byte(bridge))
	return fmt.Sprintf("%s%08x", TunnelPrefix, h.Sum32())
}

// ensureTunnel converges the bridge's VXLAN device to spec.Tunnel (absent
// when nil). The ingress filter is static and its allowlist starts empty, so
// the device admits nothing before SetRemotePorts names the remote ports.
func (m *Manager) ensureTunnel(spec network.BridgeSpec, br netlink.Link) error {
	name := TunnelName(spec.Name)
	if spec.Tunnel == nil {
		return m.deleteTunnel(name)
	}
	t := spec.Tunnel
	link, err := netlink.LinkByName(name)
	switch {
	case isLinkNotFound(err):
	case err != nil:
		return fmt.Errorf("look up tunnel %s: %w", name, err)
	default:
		vx, ok := link.(*netlink.Vxlan)
		if !ok || link.Attrs().Alias != tunnelAlias {
			return errdefs.Conflict("interface %s exists and is not minicloud's tunnel (type %s, alias %q)", name, link.Type(), link.Attrs().Alias)
		}
		if uint32(vx.VxlanId) != t.VNI || !vx.SrcAddr.Equal(t.Local.AsSlice()) || vx.Port != VXLANPort || vx.Learning || !vx.Proxy || len(vx.Group) > 0 && !vx.Group.IsUnspecified() {
			// A VNI or underlay address cannot change in place: replace the device.
			m.log.Info("replacing tunnel", "tunnel", name, "vni", t.VNI, "local", t.Local)
			if err := netlink.LinkDel(link); err != nil && !isLinkNotFound(err) {
				return fmt.Errorf("delete outdated tunnel %s: %w", name, err)
			}
			link = nil
		}
	}
	mtu := br.Attrs().MTU
	if link == nil {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu},
			VxlanId:   int(t.VNI),
			SrcAddr:   t.Local.AsSlice(),
			Port:      VXLANPort,
			Learning:  false,
			Proxy:     true,
		}
		if err := netlink.LinkAdd(vx); err != nil {
			return fmt.Errorf("create tunnel %s (VNI %d): %w", name, t.VNI, err)
		}
		m.log.Info("created tunnel", "tunnel", name, "bridge", spec.Name, "vni", t.VNI, "local", t.Local)
		if link, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("look up tunnel %s after creating it: %w", name, err)
		}
		if err := netlink.LinkSetAlias(link, tunnelAlias); err != nil {
			return fmt.Errorf("mark tunnel %s as minicloud's: %w", name, err)
		}
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("set MTU %d on tunnel %s: %w", mtu, name, err)
		}
	}
	if err := writeSysctl("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disable IPv6 on tunnel %s: %w", name, err)
	}
	if link.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMasterByIndex(link, br.Attrs().Index); err != nil {
			return fmt.Errorf("attach tunnel %s to bridge %s: %w", name, spec.Name, err)
		}
	}
	// The bridge learns nothing from the tunnel either: remote MACs are
	// static entries, so a forged frame cannot move a MAC onto the tunnel.
	if err := netlink.LinkSetLearning(link, false); err != nil {
		return fmt.Errorf("turn off learning on tunnel port %s: %w", name, err)
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("bring tunnel %s up: %w", name, err)
		}
	}
	_, err = m.convergeVTEPs()
	return err
}

// deleteTunnel removes a VXLAN device and its allowlist; absent is fine.
func (m *Manager) deleteTunnel(name string) error {
	link, err := netlink.LinkByName(name)
	switch {
	case isLinkNotFound(err):
		// Every bridge without a tunnel comes here on every EnsureBridge,
		// so on every reconcile pass of every VM, and converging the VTEP
		// sets lists every link of the host, each VM's tap included. The
		// allowlist and the VTEP sets were converged when the tunnel went
		// (or never had one): while the ruleset's generation stays, they
		// still are (generation.go). A tunnel device someone else deletes
		// moves no generation; its VTEP entry goes within memoMaxAge.
		return m.unlessConverged("tunnel "+name, "absent", func() (bool, error) { return m.removeTunnelRules(name) })
	case err != nil:
		return fmt.Errorf("look up tunnel %s: %w", name, err)
	case link.Attrs().Alias != tunnelAlias:
		return errdefs.Conflict("interface %s is not minicloud's tunnel; not deleting it", name)
	default:
		if err := netlink.LinkDel(link); err != nil && !isLinkNotFound(err) {
			return fmt.Errorf("delete tunnel %s: %w", name, err)
		}
		m.log.Info("deleted tunnel", "tunnel", name)
	}
	delete(m.memo, "tunnel "+name)
	_, err = m.removeTunnelRules(name)
	return err
}

// removeTunnelRules empties a removed tunnel's allowlist and converges the
// VTEP sets to the tunnels left; changed: either took a transaction.
func (m *Manager) removeTunnelRules(name string) (changed bool, _ error) {
	changed, err := m.applyChanges("delete allowlist of tunnel "+name, false, func(b *batch) error {
		return b.replaceKeys(bridgeTable, setTunnelSrc, ifname(name), nil)
	})
	if err != nil {
		return false, err
	}
	vteps, err := m.convergeVTEPs()
	return changed || vteps, err
}

// convergeVTEPs makes tunnel_local and vtep_pair match every minicloud
// tunnel on the host: its local address, and (local, remote VTEP) for each
// host its forwarding entries point at. Called with m.mu held, after any
// change of a tunnel or its entries; changed: it took a transaction.
func (m *Manager) convergeVTEPs() (changed bool, _ error) {
	links, err := netlink.LinkList()
	if err != nil {
		return false, fmt.Errorf("list links: %w", err)
	}
	var locals, pairs [][]byte
	seen := map[string]bool{}
	add := func(list *[][]byte, k []byte) {
		if !seen[string(k)] {
			seen[string(k)] = true
			*list = append(*list, k)
		}
	}
	for _, l := range links {
		vx, ok := l.(*netlink.Vxlan)
		if !ok || l.Attrs().Alias != tunnelAlias {
			continue
		}
		local := vx.SrcAddr.To4()
		if local == nil {
			continue
		}
		add(&locals, slices.Clone([]byte(local)))
		fdb, err := netlink.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
		if err != nil {
			return false, fmt.Errorf("list forwarding entries of %s: %w", l.Attrs().Name, err)
		}
		for _, n := range fdb {
			if n.LinkIndex == l.Attrs().Index && n.Flags&netlink.NTF_SELF != 0 && n.IP.To4() != nil {
				add(&pairs, append(slices.Clone([]byte(local)), n.IP.To4()...))
			}
		}
	}
	return m.applyChanges("tunnel endpoints", false, func(b *batch) error {
		if err := b.replaceKeys(inetTable, setTunnelLocal, nil, locals); err != nil {
			return err
		}
		return b.replaceKeys(inetTable, setVTEPPair, nil, pairs)
	})
}

// tunnelOf reports the bridge's tunnel as ListBridges sees it.
func tunnelOf(bridge string) *network.TunnelSpec {
	link, err := netlink.LinkByName(TunnelName(bridge))
	if err != nil {
		return nil
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok || link.Attrs().Alias != tunnelAlias {
		return nil
	}
	local, _ := netip.AddrFromSlice(vx.SrcAddr.To4())
	return &network.TunnelSpec{VNI: uint32(vx.VxlanId), Local: local}
}

// SetRemotePorts implements network.Manager.
func (m *Manager) SetRemotePorts(ctx context.Context, bridge string, ports []network.RemotePort) error {
	if err := network.ValidateIfName("bridge", bridge); err != nil {
		return err
	}
	for _, p := range ports {
		if err := p.Validate(); err != nil {
			return fmt.Errorf("bridge %s: %w", bridge, err)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	name := TunnelName(bridge)
	link, err := netlink.LinkByName(name)
	switch {
	case isLinkNotFound(err):
		return errdefs.FailedPrecondition("bridge %s has no tunnel (%s); ensure the network with a tunnel first", bridge, name)
	case err != nil:
		return fmt.Errorf("look up tunnel %s: %w", name, err)
	case link.Attrs().Alias != tunnelAlias:
		return errdefs.Conflict("interface %s is not minicloud's tunnel", name)
	}
	var keys [][]byte
	for _, p := range ports {
		keys = append(keys, keyTunnelSrc(name, p.MAC, p.IP))
	}
	if err := m.apply("allowlist of tunnel "+name, false, func(b *batch) error {
		return b.replaceKeys(bridgeTable, setTunnelSrc, ifname(name), keys)
	}); err != nil {
		return err
	}
	if err := convergeFDB(link, ports); err != nil {
		return fmt.Errorf("tunnel %s of bridge %s: %w", name, bridge, err)
	}
	if err := convergeNeighbours(link, ports); err != nil {
		return err
	}
	_, err = m.convergeVTEPs()
	return err
}

// fdbKey names a forwarding entry: its MAC, and for the VXLAN device's own
// entries the VTEP it sends to.
type fdbKey struct {
	mac  string
	vtep netip.Addr
}

var zeroMAC = net.HardwareAddr{0, 0, 0, 0, 0, 0}

// convergeFDB makes the tunnel's forwarding entries exactly: per remote
// port its MAC towards its VTEP (on the VXLAN device) and towards the tunnel
// port (on the bridge, static), plus the all-zero MAC towards each VTEP.
func convergeFDB(link netlink.Link, ports []network.RemotePort) error {
	idx := link.Attrs().Index
	wantSelf := map[fdbKey]bool{}
	wantMaster := map[string]bool{}
	for _, p := range ports {
		wantSelf[fdbKey{p.MAC.String(), p.VTEP}] = true
		wantSelf[fdbKey{zeroMAC.String(), p.VTEP}] = true
		wantMaster[p.MAC.String()] = true
	}
	have, err := netlink.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return fmt.Errorf("list forwarding entries: %w", err)
	}
	haveSelf := map[fdbKey]bool{}
	haveMaster := map[string]bool{}
	for _, n := range have {
		if n.LinkIndex != idx {
			continue
		}
		switch {
		case n.Flags&netlink.NTF_SELF != 0 && n.IP != nil:
			vtep, _ := netip.AddrFromSlice(n.IP.To4())
			k := fdbKey{n.HardwareAddr.String(), vtep}
			if wantSelf[k] {
				haveSelf[k] = true
				continue
			}
			del := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, HardwareAddr: n.HardwareAddr, IP: n.IP}
			if err := netlink.NeighDel(del); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("delete forwarding entry %s via %s: %w", n.HardwareAddr, n.IP, err)
			}
		// The bridge's entries for the tunnel port come back without
		// NTF_MASTER but with the bridge as master; its permanent entry
		// is the port's own MAC.
		case n.IP == nil && (n.Flags&netlink.NTF_MASTER != 0 || n.MasterIndex != 0) && n.State&netlink.NUD_PERMANENT == 0:
			k := n.HardwareAddr.String()
			if wantMaster[k] && n.State&netlink.NUD_NOARP != 0 {
				haveMaster[k] = true
				continue
			}
			del := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_MASTER, HardwareAddr: n.HardwareAddr, Vlan: n.Vlan}
			if err := netlink.NeighDel(del); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("delete bridge entry %s: %w", n.HardwareAddr, err)
			}
		}
	}
	for k := range wantSelf {
		if haveSelf[k] {
			continue
		}
		mac, _ := net.ParseMAC(k.mac)
		// Append, not replace: the all-zero MAC has one entry per VTEP.
		add := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
			Flags: netlink.NTF_SELF, HardwareAddr: mac, IP: k.vtep.AsSlice()}
		if err := netlink.NeighAppend(add); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add forwarding entry %s via %s: %w", k.mac, k.vtep, err)
		}
	}
	for k := range wantMaster {
		if haveMaster[k] {
			continue
		}
		mac, _ := net.ParseMAC(k)
		add := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_NOARP, Flags: netlink.NTF_MASTER, HardwareAddr: mac}
		if err := netlink.NeighSet(add); err != nil {
			return fmt.Errorf("add bridge entry %s: %w", k, err)
		}
	}
	return nil
}

// convergeNeighbours makes the tunnel's permanent ARP entries exactly the
// remote ports': the device's proxy answers guests' ARP from them.
func convergeNeighbours(link netlink.Link, ports []network.RemotePort) error {
	idx := link.Attrs().Index
	want := map[netip.Addr]net.HardwareAddr{}
	for _, p := range ports {
		want[p.IP] = p.MAC
	}
	have, err := netlink.NeighList(idx, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("list neighbours: %w", err)
	}
	present := map[netip.Addr]bool{}
	for _, n := range have {
		ip, _ := netip.AddrFromSlice(n.IP.To4())
		if mac, ok := want[ip]; ok && bytes.Equal(mac, n.HardwareAddr) && n.State&netlink.NUD_PERMANENT != 0 {
			present[ip] = true
			continue
		}
		if err := netlink.NeighDel(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, IP: n.IP}); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete neighbour %s: %w", n.IP, err)
		}
	}
	ips := make([]netip.Addr, 0, len(want))
	for ip := range want {
		ips = append(ips, ip)
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	for _, ip := range ips {
		if present[ip] {
			continue
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: want[ip]}
		if err := netlink.NeighSet(n); err != nil {
			return fmt.Errorf("add neighbour %s at %s: %w", ip, want[ip], err)
		}
	}
	return nil
}

// UnderlayMTU is the MTU of the interface that holds ip, this host's
// tunnel address; an error when no interface has it.
func UnderlayMTU(ip netip.Addr) (int, error) {
	addrs, err := netlink.AddrList(nil, unix.AF_INET)
	if err != nil {
		return 0, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if p, ok := toPrefix(a.IPNet); !ok || p.Addr() != ip {
			continue
		}
		link, err := netlink.LinkByIndex(a.LinkIndex)
		if err != nil {
			return 0, fmt.Errorf("look up the interface of %s: %w", ip, err)
		}
		return link.Attrs().MTU, nil
	}
	return 0, errdefs.Invalid("tunnel address %s is not an address of this host: give an address of the underlay interface", ip)
}
