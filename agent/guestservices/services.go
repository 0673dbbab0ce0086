// Package guestservices is what answers guests on their networks, per host:
// DHCP (dhcpserver), DNS (dnsserver) and the metadata service over its
// in-memory directory, wired together behind the agent's one GuestServices
// port and fed the whole set of the host's guests at once.
package guestservices

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent"
	"github.com/minicloud/minicloud/agent/guestservices/dhcpserver"
	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/metadata"
	"github.com/minicloud/minicloud/metadata/configdrive"
)

// Services composes the per-host services that answer guests — DHCP, DNS,
// and the metadata service over its in-memory directory — behind the one
// agent.GuestServices port the reconcile loop uses.
type Services struct {
	directory *metadata.Directory
	metadata  *metadata.Server
	dhcp      *dhcpserver.Server
	dns       *dnsserver.Server

	mu      sync.Mutex
	bridges map[string]bool // bridges with DHCP leases and a DNS zone
	// zones are this host's guests' records by bridge; peers are the
	// records of every VM of each network, other hosts' included
	// (SetNetworkPorts). The served zone is both, local names winning.
	zones map[string]*dnsserver.Zone
	peers map[string]map[string]netip.Addr
}

var _ agent.GuestServices = (*Services)(nil)

// New wires the services together (each logs through its own logger); Run
// serves them.
func New(dir *metadata.Directory, md *metadata.Server, dhcp *dhcpserver.Server, dns *dnsserver.Server) *Services {
	return &Services{directory: dir, metadata: md, dhcp: dhcp, dns: dns, bridges: map[string]bool{}}
}

// Run serves DHCP, DNS and metadata until ctx ends.
func (h *Services) Run(ctx context.Context) error {
	errc := make(chan error, 3)
	go func() { errc <- h.dhcp.Run(ctx) }()
	go func() { errc <- h.dns.Run(ctx) }()
	go func() { errc <- h.metadata.Serve(ctx) }()
	err := errors.Join(<-errc, <-errc, <-errc)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// SetGuests replaces the whole set of guests: the metadata directory, the
// DHCP leases of every bridge, and the bridges the metadata service
// listens on.
func (h *Services) SetGuests(_ context.Context, guests []agent.Guest) error {
	var errs []error
	insts := make([]*metadata.Instance, 0, len(guests))
	leases := map[string][]dhcpserver.Lease{}
	zones := map[string]*dnsserver.Zone{} // by bridge
	for _, g := range guests {
		inst, err := metadata.InstanceFromVM(g.VM, g.UserData)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		insts = append(insts, inst)
		for _, nic := range inst.Interfaces {
			leases[nic.Bridge] = append(leases[nic.Bridge], dhcpserver.Lease{
				MAC:      nic.MAC,
				Address:  nic.Address,
				Gateway:  nic.Gateway,
				DNS:      resolversOf(g.VM, nic.Bridge, nic.Gateway),
				MTU:      nic.MTU,
				Hostname: inst.Hostname,
				Domain:   inst.Domain,
			})
			z := zones[nic.Bridge]
			if z == nil {
				z = &dnsserver.Zone{Listen: nic.Gateway, Domain: inst.Domain, Records: map[string]netip.Addr{}}
				zones[nic.Bridge] = z
			}
			z.Records[inst.Hostname] = nic.Address.Addr()
		}
	}
	if err := h.directory.Set(insts); err != nil {
		errs = append(errs, fmt.Errorf("metadata directory: %w", err))
	}

	h.mu.Lock()
	defer h.mu.Unlock()
	var serve []string
	for bridge, ls := range leases {
		if err := h.dhcp.SetLeases(bridge, ls); err != nil {
			errs = append(errs, fmt.Errorf("DHCP leases on %s: %w", bridge, err))
		}
		if err := h.dns.SetZone(bridge, h.zoneWithPeers(bridge, zones[bridge])); err != nil {
			errs = append(errs, fmt.Errorf("DNS zone on %s: %w", bridge, err))
		}
		// A bridge appears in the reconcile of its first VM, which
		// publishes again right after creating it.
		if _, err := netlink.LinkByName(bridge); err != nil {
			var nf netlink.LinkNotFoundError
			if !errors.As(err, &nf) {
				errs = append(errs, fmt.Errorf("look up bridge %s: %w", bridge, err))
			}
			continue
		}
		serve = append(serve, bridge)
	}
	for bridge := range h.bridges {
		if _, used := leases[bridge]; used {
			continue
		}
		if err := h.dhcp.SetLeases(bridge, nil); err != nil {
			errs = append(errs, fmt.Errorf("clear DHCP leases on %s: %w", bridge, err))
		}
		h.dns.RemoveZone(bridge)
	}
	// Level-triggered: also re-binds a bridge that was re-created under the
	// same name.
	if err := h.metadata.SyncInterfaces(serve); err != nil {
		errs = append(errs, fmt.Errorf("metadata listeners: %w", err))
	}
	h.bridges = map[string]bool{}
	for b := range leases {
		h.bridges[b] = true
	}
	h.zones = zones
	return errors.Join(errs...)
}

// SetNetworkPorts implements the agent's PeerDirectory: DNS of each network
// this host serves also answers for the network's VMs on other hosts.
func (h *Services) SetNetworkPorts(_ context.Context, ports []*minicloudv1.NetworkPort) error {
	peers := map[string]map[string]netip.Addr{}
	for _, p := range ports {
		ip, err := netip.ParseAddr(p.GetIp())
		if err != nil || p.GetHostname() == "" {
			continue
		}
		if peers[p.GetBridge()] == nil {
			peers[p.GetBridge()] = map[string]netip.Addr{}
		}
		peers[p.GetBridge()][p.GetHostname()] = ip
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.peers = peers
	var errs []error
	for bridge, z := range h.zones {
		if err := h.dns.SetZone(bridge, h.zoneWithPeers(bridge, z)); err != nil {
			errs = append(errs, fmt.Errorf("DNS zone on %s: %w", bridge, err))
		}
	}
	return errors.Join(errs...)
}

// zoneWithPeers is the local zone plus the network's other VMs. Called
// with h.mu held.
func (h *Services) zoneWithPeers(bridge string, local *dnsserver.Zone) dnsserver.Zone {
	z := *local
	z.Records = make(map[string]netip.Addr, len(local.Records)+len(h.peers[bridge]))
	for name, ip := range h.peers[bridge] {
		z.Records[name] = ip
	}
	for name, ip := range local.Records {
		z.Records[name] = ip
	}
	return z
}

// resolversOf is what DHCP tells a guest to resolve with: the network's
// dns_servers, or the gateway (this host's DNS service).
func resolversOf(vm *minicloudv1.VM, bridge string, gateway netip.Addr) []netip.Addr {
	for _, a := range vm.GetStatus().GetAddresses() {
		if a.GetBridge() != bridge || len(a.GetDnsServers()) == 0 {
			continue
		}
		var out []netip.Addr
		for _, d := range a.GetDnsServers() {
			if ip, err := netip.ParseAddr(d); err == nil && ip.Is4() {
				out = append(out, ip)
			}
		}
		if len(out) > 0 {
			return out
		}
	}
	return []netip.Addr{gateway}
}

// BuildConfigDrive writes g's config drive in the layout its spec asks for.
func (h *Services) BuildConfigDrive(_ context.Context, g agent.Guest, path string) error {
	inst, err := metadata.InstanceFromVM(g.VM, g.UserData)
	if err != nil {
		return err
	}
	layout, err := configdrive.ParseLayout(g.VM.GetSpec().GetConfigDriveFormat())
	if err != nil {
		return agent.Permanent("ConfigDriveInvalid", err)
	}
	return configdrive.WriteFile(path, inst, layout)
}

// GuestSeen reports when the guest last read its metadata.
func (h *Services) GuestSeen(vmID string) (time.Time, bool) {
	return h.metadata.LastSeen(vmID)
}

// Bridges lists the bridges being served, sorted (for tests and logs).
func (h *Services) Bridges() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]string, 0, len(h.bridges))
	for b := range h.bridges {
		out = append(out, b)
	}
	sort.Strings(out)
	return out
}
