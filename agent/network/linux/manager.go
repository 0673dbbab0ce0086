// Package linux implements network.Manager with netlink (bridges, taps) and
// nftables (anti-spoofing, host protection, NAT) on the local host.
package linux

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Link aliases (IFLA_IFALIAS) mark what minicloud owns, so garbage
// collection never touches an interface someone else created, and so a port
// remembers its VM across agent restarts.
const (
	bridgeAlias     = "minicloud:bridge"
	portAliasPrefix = "minicloud:port vm="
)

// Manager is the Linux network.Manager. It is safe for concurrent use; its
// only state is the kernel's, so any number of Managers (an agent and its
// restarted successor) can look at the same host. (It remembers what it
// found converged, but only as of a ruleset generation the kernel keeps:
// generation.go.)
type Manager struct {
	log *slog.Logger
	// mu serialises read-measure-write cycles on the ruleset.
	mu        sync.Mutex
	protected []netip.Prefix
	// baseOK records that this Manager verified the tables, chains, sets and
	// static rules; port changes then skip that check (guarded by mu).
	baseOK bool
	// memo: the bridges and ports whose rules were found converged, and
	// at which ruleset generation (generation.go; guarded by mu).
	memo converged
	// readings counts the ruleset reads of applyChanges (a test sees
	// the memo skip them; guarded by mu).
	readings int
	// baseReads counts the reads of the static ruleset (tests; guarded
	// by mu).
	baseReads int
	// bridges shares one EnsureBridge run among concurrent callers with
	// the same spec (every VM of a network ensures its bridge).
	bridges coalescer[bridgeKey]
}

// bridgeKey is a BridgeSpec as a map key (its tunnel by value).
type bridgeKey struct {
	name    string
	gateway netip.Prefix
	mtu     int
	nat     bool
	tunnel  network.TunnelSpec
	tunnels bool
}

func keyOf(spec network.BridgeSpec) bridgeKey {
	k := bridgeKey{name: spec.Name, gateway: spec.GatewayCIDR, mtu: spec.MTU, nat: spec.NAT}
	if spec.Tunnel != nil {
		k.tunnel, k.tunnels = *spec.Tunnel, true
	}
	return k
}

// apply runs one nftables transaction built by fill. The static ruleset is
// verified first when verify is set or not yet verified; a transaction that
// fails on an unverified base (someone deleted our table?) is retried once
// after verifying it.
func (m *Manager) apply(what string, verify bool, fill func(*batch) error) error {
	_, err := m.applyChanges(what, verify, fill)
	return err
}

// applyChanges is apply, and reports whether it sent a transaction (the
// ruleset was not converged).
func (m *Manager) applyChanges(what string, verify bool, fill func(*batch) error) (changed bool, _ error) {
	for attempt := 0; ; attempt++ {
		m.readings++
		before, genErr := rulesetGeneration()
		b, err := newBatch(m.protected)
		if err != nil {
			return false, err
		}
		// A base found intact at this very generation needs no second
		// look even when verify asks for one (generation.go): a network's
		// first VM, whose bridge is new, waited ~7 ms for it.
		checked := verify && !m.memo.current(memoBase, "", before, genErr == nil) || !m.baseOK || attempt > 0
		if checked {
			m.baseReads++
			if err := b.ensureBase(); err != nil {
				delete(m.memo, memoBase)
				return false, err
			}
			if genErr == nil {
				// As read at before; this transaction's own commit carries
				// it on (followOwnCommit), anyone else's leaves it behind.
				m.memo.record(memoBase, "", before)
			}
		}
		if err := fill(b); err != nil {
			return false, err
		}
		err = b.flush(what)
		if err == nil {
			m.baseOK = m.baseOK || checked
			if b.changes > 0 {
				m.followOwnCommit(before, genErr == nil)
			}
			return b.changes > 0, nil
		}
		m.baseOK = false
		delete(m.memo, memoBase)
		if checked {
			return false, err
		}
	}
}

// unlessConverged runs converge, which reads and converges the rules of
// one bridge, port or tunnel (name; spec: what they must say) and reports
// whether it changed any, unless the ruleset's generation has not moved
// since they were last found converged (generation.go).
func (m *Manager) unlessConverged(name, spec string, converge func() (changed bool, err error)) error {
	gen, err := rulesetGeneration()
	known := err == nil
	if err != nil {
		m.log.Debug("reading the whole ruleset: its generation is unknown", "err", err)
	}
	if m.memo.current(name, spec, gen, known) {
		return nil
	}
	if known {
		// Recorded now, as read at gen: converge's own commits carry it
		// to their generation (followOwnCommit), anyone else's commit in
		// between leaves it behind, no longer matching.
		m.memo.record(name, spec, gen)
	}
	if _, err := converge(); err != nil || !known {
		delete(m.memo, name)
		return err
	}
	return nil
}

var _ network.Manager = (*Manager)(nil)

// Option configures a Manager.
type Option func(*Manager)

// WithProtectedNets keeps guests from routing to these networks: the
// management networks where other hypervisors' agents, etcd and the API
// listen. (The host's own services are always closed to guests.)
func WithProtectedNets(nets ...netip.Prefix) Option {
	return func(m *Manager) { m.protected = append(m.protected, nets...) }
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(log *slog.Logger) Option { return func(m *Manager) { m.log = log } }

// New returns a Manager. It changes nothing on the host until called.
func New(opts ...Option) *Manager {
	m := &Manager{memo: converged{}}
	for _, o := range opts {
		o(m)
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	return m
}

// EnsureBridge implements network.Manager.
func (m *Manager) EnsureBridge(ctx context.Context, spec network.BridgeSpec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	return m.bridges.do(keyOf(spec), func() error { return m.ensureBridge(spec) })
}

func (m *Manager) ensureBridge(spec network.BridgeSpec) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	// A new bridge only: one that exists already routes its network, and
	// tearing it down would cut its guests off.
	if _, err := netlink.LinkByName(spec.Name); isLinkNotFound(err) {
		if err := m.hostConflict(spec.GatewayCIDR.Masked()); err != nil {
			return err
		}
	}
	// Rules first, keyed by name: the bridge is protected from its first
	// instant of existence.
	if err := m.ensureBridgeRules(spec); err != nil {
		return err
	}
	if err := ensureForwarding(); err != nil {
		return err
	}
	br, err := m.ensureBridgeLink(spec)
	if err != nil {
		return err
	}
	return m.ensureTunnel(spec, br)
}

func (m *Manager) ensureBridgeRules(spec network.BridgeSpec) error {
	return m.unlessConverged("bridge "+spec.Name, fmt.Sprintf("%+v", keyOf(spec)), func() (bool, error) {
		return m.applyChanges("ensure rules of bridge "+spec.Name, true, func(b *batch) error { return bridgeElements(b, spec) })
	})
}

func bridgeElements(b *batch, spec network.BridgeSpec) error {
	name := spec.Name
	gw := spec.GatewayCIDR.Addr()
	if err := b.replaceKeys(inetTable, setBridges, ifname(name), [][]byte{ifname(name)}); err != nil {
		return err
	}
	if err := b.replaceKeys(inetTable, setBridgeGW, ifname(name), [][]byte{keyIfIP(name, gw)}); err != nil {
		return err
	}
	if err := b.replaceKeys(inetTable, setSameNet, ifname(name), [][]byte{append(ifname(name), ifname(name)...)}); err != nil {
		return err
	}
	gws, err := b.bridgeGateways()
	if err != nil {
		return err
	}
	gws[name] = gw
	if err := b.setReservedTo(gws); err != nil {
		return err
	}
	return b.convergeNAT(name, spec.GatewayCIDR.Masked(), spec.NAT)
}

// convergeNAT makes the bridge's masquerade rule exist (or not) with the
// current CIDR.
func (b *batch) convergeNAT(bridge string, cidr netip.Prefix, on bool) error {
	rules, err := b.natRules()
	if err != nil {
		return err
	}
	want := ""
	if on {
		want = ruleGeneration + ": " + natComment(bridge, cidr)
	}
	found := false
	for comment, r := range rules {
		if !strings.HasPrefix(comment, ruleGeneration+": nat "+bridge+" ") && !strings.HasPrefix(comment, "nat "+bridge+" ") {
			continue
		}
		if comment == want {
			found = true
			continue
		}
		b.changes++
		if err := b.conn.DelRule(r); err != nil {
			return fmt.Errorf("delete NAT rule %q: %w", comment, err)
		}
	}
	if on && !found {
		c := newChainByName(chainPostrouting)
		b.changes++
		b.conn.AddRule(masqueradeRule(bridge, cidr).rule(c))
	}
	return nil
}

func newChainByName(name string) *nftables.Chain {
	for _, c := range newChains() {
		if c.Name == name {
			return c
		}
	}
	panic("unknown chain " + name)
}

func (m *Manager) ensureBridgeLink(spec network.BridgeSpec) (netlink.Link, error) {
	name := spec.Name
	mtu := spec.MTU
	if mtu == 0 {
		mtu = 1500
	}
	link, err := netlink.LinkByName(name)
	switch {
	case isLinkNotFound(err):
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu, HardwareAddr: stableMAC(name)}}
		if err := netlink.LinkAdd(br); err != nil {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		m.log.Info("created bridge", "bridge", name)
		if link, err = netlink.LinkByName(name); err != nil {
			return nil, fmt.Errorf("look up bridge %s after creating it: %w", name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("look up bridge %s: %w", name, err)
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return nil, errdefs.Conflict("interface %s exists and is a %s, not a bridge", name, link.Type())
	}
	if a := link.Attrs().Alias; a != bridgeAlias {
		if a != "" {
			return nil, errdefs.Conflict("bridge %s exists and is not minicloud's (alias %q)", name, a)
		}
		if err := netlink.LinkSetAlias(link, bridgeAlias); err != nil {
			return nil, fmt.Errorf("mark bridge %s as minicloud's: %w", name, err)
		}
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return nil, fmt.Errorf("set MTU %d on bridge %s: %w", mtu, name, err)
		}
	}
	// Guests get no IPv6 yet: keep the host off IPv6 on guest networks too
	// (no link-local address, no router solicitations towards guests).
	if err := writeSysctl("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("disable IPv6 on bridge %s: %w", name, err)
	}
	// The metadata address has host scope so the kernel never picks it as
	// the source of the host's own packets on the bridge (DHCP replies leave
	// from the gateway); packets to it are still accepted and ARP answered.
	if err := ensureAddrs(link, []addrSpec{
		{prefix: spec.GatewayCIDR, scope: unix.RT_SCOPE_UNIVERSE},
		{prefix: netip.PrefixFrom(network.MetadataAddr, 32), scope: unix.RT_SCOPE_HOST},
	}); err != nil {
		return nil, fmt.Errorf("addresses of bridge %s: %w", name, err)
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("bring bridge %s up: %w", name, err)
		}
	}
	return link, nil
}

type addrSpec struct {
	prefix netip.Prefix
	scope  int
}

// ensureAddrs converges the link's IPv4 addresses to exactly want.
func ensureAddrs(link netlink.Link, want []addrSpec) error {
	have, err := netlink.AddrList(link, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	present := map[netip.Prefix]bool{}
	for _, a := range have {
		p, ok := toPrefix(a.IPNet)
		if ok && slices.ContainsFunc(want, func(w addrSpec) bool { return w.prefix == p }) {
			present[p] = true
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil {
			return fmt.Errorf("remove stale address %s: %w", a.IPNet, err)
		}
	}
	for _, w := range want {
		if present[w.prefix] {
			continue
		}
		addr := &netlink.Addr{IPNet: toIPNet(w.prefix), Scope: w.scope}
		if err := netlink.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add address %s: %w", w.prefix, err)
		}
	}
	return nil
}

// DeleteBridge implements network.Manager.
func (m *Manager) DeleteBridge(ctx context.Context, name string) error {
	if err := network.ValidateIfName("bridge", name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.deleteTunnel(TunnelName(name)); err != nil {
		return err
	}
	link, err := netlink.LinkByName(name)
	switch {
	case isLinkNotFound(err):
	case err != nil:
		return fmt.Errorf("look up bridge %s: %w", name, err)
	default:
		if !isMinicloudBridge(link) {
			return errdefs.Conflict("interface %s is not a minicloud bridge; not deleting it", name)
		}
		if err := netlink.LinkDel(link); err != nil && !isLinkNotFound(err) {
			return fmt.Errorf("delete bridge %s: %w", name, err)
		}
		m.log.Info("deleted bridge", "bridge", name)
	}
	delete(m.memo, "bridge "+name)
	delete(m.memo, "tunnel "+TunnelName(name))
	return m.apply("delete rules of bridge "+name, true, func(b *batch) error { return deleteBridgeElements(b, name) })
}

func deleteBridgeElements(b *batch, name string) error {
	for _, t := range []struct {
		table *nftables.Table
		set   string
	}{{inetTable, setBridges}, {inetTable, setBridgeGW}, {inetTable, setSameNet}} {
		if err := b.replaceKeys(t.table, t.set, ifname(name), nil); err != nil {
			return err
		}
	}
	gws, err := b.bridgeGateways()
	if err != nil {
		return err
	}
	delete(gws, name)
	if err := b.setReservedTo(gws); err != nil {
		return err
	}
	return b.convergeNAT(name, netip.Prefix{}, false)
}

// ListBridges implements network.Manager.
func (m *Manager) ListBridges(ctx context.Context) ([]network.BridgeSpec, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	b, err := newBatch(nil)
	if err != nil {
		return nil, err
	}
	nat, err := b.natRules()
	if err != nil {
		return nil, err
	}
	var out []network.BridgeSpec
	for _, l := range links {
		if !isMinicloudBridge(l) || l.Attrs().Alias != bridgeAlias {
			continue
		}
		spec := network.BridgeSpec{Name: l.Attrs().Name, MTU: l.Attrs().MTU, Tunnel: tunnelOf(l.Attrs().Name)}
		addrs, err := netlink.AddrList(l, unix.AF_INET)
		if err != nil {
			return nil, fmt.Errorf("list addresses of bridge %s: %w", spec.Name, err)
		}
		for _, a := range addrs {
			if p, ok := toPrefix(a.IPNet); ok && p.Addr() != network.MetadataAddr {
				spec.GatewayCIDR = p
				break
			}
		}
		if spec.GatewayCIDR.IsValid() {
			_, spec.NAT = nat[ruleGeneration+": "+natComment(spec.Name, spec.GatewayCIDR.Masked())]
		}
		out = append(out, spec)
	}
	return out, nil
}

// EnsurePort implements network.Manager.
func (m *Manager) EnsurePort(ctx context.Context, spec network.PortSpec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	br, err := netlink.LinkByName(spec.Bridge)
	switch {
	case isLinkNotFound(err):
		return errdefs.FailedPrecondition("port %s: bridge %s does not exist; ensure the network first", spec.TapName, spec.Bridge)
	case err != nil:
		return fmt.Errorf("look up bridge %s: %w", spec.Bridge, err)
	case !isMinicloudBridge(br):
		return errdefs.FailedPrecondition("port %s: %s is not a minicloud bridge", spec.TapName, spec.Bridge)
	}
	if err := checkInNetwork(br, spec); err != nil {
		return err
	}
	link, err := m.ensurePortLink(spec)
	if err != nil {
		return err
	}
	// The filter goes in before the port joins the bridge and comes up.
	if err := m.ensurePortRules(spec); err != nil {
		return err
	}
	mtu := spec.MTU
	if mtu == 0 {
		mtu = br.Attrs().MTU
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("set MTU %d on port %s: %w", mtu, spec.TapName, err)
		}
	}
	// The host side of a port needs no address of its own, IPv6 link-local
	// included (it would talk to the guest directly, bypassing the bridge).
	if err := writeSysctl("/proc/sys/net/ipv6/conf/"+spec.TapName+"/disable_ipv6", "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disable IPv6 on port %s: %w", spec.TapName, err)
	}
	if link.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMasterByIndex(link, br.Attrs().Index); err != nil {
			return fmt.Errorf("attach port %s to bridge %s: %w", spec.TapName, spec.Bridge, err)
		}
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("bring port %s up: %w", spec.TapName, err)
		}
	}
	return nil
}

// checkInNetwork refuses a port address outside the bridge's network, or
// one the host itself uses there.
func checkInNetwork(br netlink.Link, spec network.PortSpec) error {
	addrs, err := netlink.AddrList(br, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("list addresses of bridge %s: %w", spec.Bridge, err)
	}
	for _, a := range addrs {
		p, ok := toPrefix(a.IPNet)
		if !ok || p.Addr() == network.MetadataAddr {
			continue
		}
		bs := network.BridgeSpec{Name: spec.Bridge, GatewayCIDR: p}
		if err := bs.CheckGuestIP(spec.IP); err != nil {
			return fmt.Errorf("port %s: %w", spec.TapName, err)
		}
	}
	return nil
}

func (m *Manager) ensurePortLink(spec network.PortSpec) (netlink.Link, error) {
	name := spec.TapName
	alias := portAliasPrefix + spec.VMID
	link, err := netlink.LinkByName(name)
	switch {
	case isLinkNotFound(err) && spec.Existing:
		return nil, errdefs.NotFound("port %s: interface to adopt does not exist", name)
	case isLinkNotFound(err):
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			// No multi-queue: QEMU reattaches with the same queue mode.
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR,
			Owner: 0, Group: 0,
		}
		if err := netlink.LinkAdd(tap); err != nil {
			return nil, fmt.Errorf("create tap %s: %w", name, err)
		}
		m.log.Info("created tap", "tap", name, "vm", spec.VMID)
		if link, err = netlink.LinkByName(name); err != nil {
			return nil, fmt.Errorf("look up tap %s after creating it: %w", name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("look up port %s: %w", name, err)
	}
	if !spec.Existing {
		if t, ok := link.(*netlink.Tuntap); !ok || t.Mode != netlink.TUNTAP_MODE_TAP {
			return nil, errdefs.Conflict("interface %s exists and is a %s, not a tap", name, link.Type())
		}
	}
	switch a := link.Attrs().Alias; {
	case a == alias:
	case a == "" || strings.HasPrefix(a, portAliasPrefix) && spec.Existing:
		if err := netlink.LinkSetAlias(link, alias); err != nil {
			return nil, fmt.Errorf("mark port %s as VM %s's: %w", name, spec.VMID, err)
		}
	case strings.HasPrefix(a, portAliasPrefix):
		return nil, errdefs.Conflict("port %s belongs to VM %s, not %s", name, strings.TrimPrefix(a, portAliasPrefix), spec.VMID)
	default:
		return nil, errdefs.Conflict("interface %s exists and is not minicloud's (alias %q)", name, a)
	}
	if !spec.Existing {
		// The tap's own MAC must differ from the guest's, and starting with
		// 0xfe keeps the bridge from ever adopting it as its own address.
		hw := slices.Clone(spec.MAC)
		hw[0] = 0xfe
		if !slices.Equal(link.Attrs().HardwareAddr, hw) {
			if err := netlink.LinkSetHardwareAddr(link, hw); err != nil {
				return nil, fmt.Errorf("set MAC %s on tap %s: %w", hw, name, err)
			}
		}
	}
	return link, nil
}

func (m *Manager) ensurePortRules(spec network.PortSpec) error {
	return m.unlessConverged("port "+spec.TapName, spec.MAC.String()+" "+spec.IP.String(), func() (bool, error) {
		return m.applyChanges("ensure filter of port "+spec.TapName, false, func(b *batch) error {
			return b.portElements(spec.TapName, spec.MAC, spec.IP)
		})
	})
}

// portElements converges a port's set elements; a zero mac removes them.
func (b *batch) portElements(tap string, mac net.HardwareAddr, ip netip.Addr) error {
	var macs, ips [][]byte
	if mac != nil {
		macs = [][]byte{keyPortMAC(tap, mac)}
		ips = [][]byte{keyIfIP(tap, ip)}
	}
	if err := b.replaceKeys(bridgeTable, setPortMAC, ifname(tap), macs); err != nil {
		return err
	}
	return b.replaceKeys(bridgeTable, setPortIP4, ifname(tap), ips)
}

// DeletePort implements network.Manager.
func (m *Manager) DeletePort(ctx context.Context, tapName string) error {
	if err := network.ValidateIfName("port", tapName); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	link, err := netlink.LinkByName(tapName)
	switch {
	case isLinkNotFound(err):
	case err != nil:
		return fmt.Errorf("look up port %s: %w", tapName, err)
	default:
		if !isMinicloudPort(link) {
			return errdefs.Conflict("interface %s is not a minicloud port; not deleting it", tapName)
		}
		// Down first: the port stops forwarding before its filter goes.
		if err := netlink.LinkSetDown(link); err != nil && !isLinkNotFound(err) {
			return fmt.Errorf("bring port %s down: %w", tapName, err)
		}
		if err := netlink.LinkDel(link); err != nil && !isLinkNotFound(err) {
			return fmt.Errorf("delete port %s: %w", tapName, err)
		}
		m.log.Info("deleted port", "port", tapName)
	}
	delete(m.memo, "port "+tapName)
	return m.apply("delete filter of port "+tapName, false, func(b *batch) error {
		return b.portElements(tapName, nil, netip.Addr{})
	})
}

// ListPorts implements network.Manager. Ports whose filter is missing are
// reported with a zero MAC and IP; filters whose interface is gone are
// reported with an empty Bridge and VMID, so DeletePort can clear them.
func (m *Manager) ListPorts(ctx context.Context) ([]network.PortSpec, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	b, err := newBatch(nil)
	if err != nil {
		return nil, err
	}
	filters, err := b.portFilters()
	if err != nil {
		return nil, err
	}
	byIndex := map[int]string{}
	for _, l := range links {
		byIndex[l.Attrs().Index] = l.Attrs().Name
	}
	var out []network.PortSpec
	for _, l := range links {
		a := l.Attrs()
		// A tap without alias is a create interrupted before its alias:
		// still ours to collect.
		if !strings.HasPrefix(a.Alias, portAliasPrefix) &&
			!(strings.HasPrefix(a.Name, network.PortPrefix) && isMinicloudPort(l)) {
			continue
		}
		_, isTap := l.(*netlink.Tuntap)
		f := filters[a.Name]
		delete(filters, a.Name)
		out = append(out, network.PortSpec{
			VMID: strings.TrimPrefix(a.Alias, portAliasPrefix), TapName: a.Name,
			Bridge: byIndex[a.MasterIndex], MAC: f.mac, IP: f.ip, MTU: a.MTU, Existing: !isTap,
		})
	}
	for name, f := range filters {
		out = append(out, network.PortSpec{TapName: name, MAC: f.mac, IP: f.ip})
	}
	slices.SortFunc(out, func(a, b network.PortSpec) int { return strings.Compare(a.TapName, b.TapName) })
	return out, nil
}

// Sync implements network.Manager.
func (m *Manager) Sync(ctx context.Context, bridges []network.BridgeSpec, ports []network.PortSpec) error {
	var errs []error
	wantBridge := map[string]bool{}
	for _, b := range bridges {
		wantBridge[b.Name] = true
		if err := m.EnsureBridge(ctx, b); err != nil {
			errs = append(errs, err)
		}
	}
	wantPort := map[string]bool{}
	for _, p := range ports {
		wantPort[p.TapName] = true
		if err := m.EnsurePort(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	have, err := m.ListPorts(ctx)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, p := range have {
		if !wantPort[p.TapName] {
			if err := m.DeletePort(ctx, p.TapName); err != nil {
				errs = append(errs, err)
			}
		}
	}
	haveBr, err := m.ListBridges(ctx)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, b := range haveBr {
		if !wantBridge[b.Name] {
			if err := m.DeleteBridge(ctx, b.Name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

func isMinicloudBridge(l netlink.Link) bool {
	_, ok := l.(*netlink.Bridge)
	return ok && (l.Attrs().Alias == bridgeAlias || l.Attrs().Alias == "")
}

// isMinicloudPort accepts a tap with no alias yet: a create interrupted
// between the tap and its alias must still be cleaned up.
func isMinicloudPort(l netlink.Link) bool {
	a := l.Attrs().Alias
	if strings.HasPrefix(a, portAliasPrefix) {
		return true
	}
	_, isTap := l.(*netlink.Tuntap)
	return isTap && a == ""
}

// stableMAC derives the bridge's MAC from its name, so it never changes as
// ports come and go or across re-creations (guests keep a valid ARP entry for
// the gateway).
func stableMAC(name string) net.HardwareAddr {
	h := fnv.New64a()
	h.Write([]byte(name))
	s := h.Sum(nil)
	return net.HardwareAddr{0x02, s[0], s[1], s[2], s[3], s[4]}
}

func ensureForwarding() error {
	return writeSysctl("/proc/sys/net/ipv4/ip_forward", "1")
}

func writeSysctl(path, value string) error {
	cur, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if strings.TrimSpace(string(cur)) == value {
		return nil
	}
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func toPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a, ones), true
}

func toIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}
