package linux

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
)

// hostConflict reports whether a new bridge for cidr would overlap the
// host's own routing: a route of any table but the local one (its own
// addresses' connected routes are in main), other than the default route
// and other than routes through bridges minicloud made (other guest
// networks are disjoint by the API's rule: only a deleted network's bridge
// not yet collected can overlap), or a protected management network.
func (m *Manager) hostConflict(cidr netip.Prefix) error {
	for _, p := range m.protected {
		if p.Overlaps(cidr) {
			return &network.HostConflictError{CIDR: cidr, Route: p, Via: "--protected-nets"}
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list host routes: %w", err)
	}
	for _, r := range routes {
		if r.Table == unix.RT_TABLE_LOCAL || r.Dst == nil {
			continue
		}
		dst, ok := toPrefix(r.Dst)
		if !ok || dst.Bits() == 0 || !dst.Overlaps(cidr) {
			continue
		}
		via := "no device"
		if r.LinkIndex > 0 {
			l, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return fmt.Errorf("link of route to %s: %w", dst, err)
			}
			if _, br := l.(*netlink.Bridge); br && l.Attrs().Alias == bridgeAlias {
				continue
			}
			via = "dev " + l.Attrs().Name
		}
		if r.Gw != nil {
			via = "via " + r.Gw.String() + " " + via
		}
		if r.Table != unix.RT_TABLE_MAIN {
			via += fmt.Sprintf(" table %d", r.Table)
		}
		return &network.HostConflictError{CIDR: cidr, Route: dst, Via: via}
	}
	return nil
}
