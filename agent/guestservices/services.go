// Package guestservices is what answers guests on their networks, per host:
// DHCP (dhcpserver), DNS (dnsserver) and the metadata service over its
// in-memory directory, wired together behind the agent's one GuestServices
// port and fed the host's guests one change at a time.
package guestservices

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
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
//
// Guests are updated one at a time (UpdateGuests): a guest whose resource
// version and user-data did not change costs a map lookup, and a changed
// one touches its own directory entry, leases and DNS names only, so the
// cost of a change does not grow with the number of guests on the host.
type Services struct {
	directory *metadata.Directory
	metadata  *metadata.Server
	dhcp      *dhcpserver.Server
	dns       *dnsserver.Server

	mu sync.Mutex
	// guests is what is served for each VM id.
	guests map[string]*served
	// leases counts the DHCP leases of each bridge: the bridges served.
	leases map[string]int
	// zones are this host's guests' records by bridge; peers are the
	// records of every VM of each network, other hosts' included
	// (SetNetworkPorts). The served zone is both, local names winning.
	zones map[string]*dnsserver.Zone
	peers map[string]map[string]netip.Addr
	// claims are the local guests that claim each name of each bridge
	// (VM id -> address): two guests with one name are answered with the
	// smaller id's address, whatever order they came in.
	claims map[string]map[string]map[string]netip.Addr
}

// served is what one guest was given.
type served struct {
	version  int64
	userData []byte
	leases   []leaseKey // DHCP leases it holds
	names    []nameKey  // DNS names it claims
}

type leaseKey struct {
	bridge string
	mac    string
}

type nameKey struct {
	bridge, name string
}

var _ agent.GuestServices = (*Services)(nil)

// New wires the services together (each logs through its own logger); Run
// serves them.
func New(dir *metadata.Directory, md *metadata.Server, dhcp *dhcpserver.Server, dns *dnsserver.Server) *Services {
	return &Services{directory: dir, metadata: md, dhcp: dhcp, dns: dns,
		guests: map[string]*served{}, leases: map[string]int{}, zones: map[string]*dnsserver.Zone{},
		claims: map[string]map[string]map[string]netip.Addr{}}
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

// SetGuests replaces the whole set of guests: those not in guests are
// removed, the others updated as by UpdateGuests.
func (h *Services) SetGuests(ctx context.Context, guests []agent.Guest) error {
	keep := make(map[string]bool, len(guests))
	for _, g := range guests {
		keep[g.VM.GetMeta().GetId()] = true
	}
	h.mu.Lock()
	var remove []string
	for id := range h.guests {
		if !keep[id] {
			remove = append(remove, id)
		}
	}
	h.mu.Unlock()
	return h.UpdateGuests(ctx, guests, remove)
}

// UpdateGuests implements agent.GuestServices: each of upsert replaces
// what is served for its VM (unless it is older than what is served: a
// lower resource version is ignored), each id of remove stops being
// served at once. Then the metadata service listens on every bridge with
// guests that exists (a bridge appears in the reconcile of its first VM,
// which publishes again right after creating it; a bridge re-created
// under the same name is re-bound).
func (h *Services) UpdateGuests(_ context.Context, upsert []agent.Guest, remove []string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var errs []error
	for _, id := range remove {
		h.removeLocked(id)
	}
	for _, g := range upsert {
		if err := h.upsertLocked(g); err != nil {
			errs = append(errs, err)
		}
	}
	var serve []string
	for bridge := range h.leases {
		if _, err := netlink.LinkByName(bridge); err != nil {
			var nf netlink.LinkNotFoundError
			if !errors.As(err, &nf) {
				errs = append(errs, fmt.Errorf("look up bridge %s: %w", bridge, err))
			}
			continue
		}
		serve = append(serve, bridge)
	}
	if err := h.metadata.SyncInterfaces(serve); err != nil {
		errs = append(errs, fmt.Errorf("metadata listeners: %w", err))
	}
	return errors.Join(errs...)
}

// upsertLocked serves g, replacing what its VM had. h.mu must be held.
func (h *Services) upsertLocked(g agent.Guest) error {
	id, version := g.VM.GetMeta().GetId(), g.VM.GetMeta().GetResourceVersion()
	old := h.guests[id]
	if old != nil && (version < old.version || version == old.version && bytes.Equal(g.UserData, old.userData)) {
		return nil // older than what is served, or the same
	}
	now := &served{version: version, userData: g.UserData}
	inst, err := metadata.InstanceFromVM(g.VM, g.UserData)
	if err == nil {
		err = h.directory.Upsert(inst)
	}
	if err != nil {
		// Not served at all rather than half: remembered, so that the
		// same version is not tried (and reported) on every pass.
		h.directory.Remove(id)
		h.dropLocked(id, old, now)
		h.guests[id] = now
		return fmt.Errorf("guest %s: %w", id, err)
	}
	var errs []error
	for _, nic := range inst.Interfaces {
		l := dhcpserver.Lease{
			MAC:      nic.MAC,
			Address:  nic.Address,
			Gateway:  nic.Gateway,
			DNS:      resolversOf(g.VM, nic.Bridge, nic.Gateway),
			MTU:      nic.MTU,
			Hostname: inst.Hostname,
			Domain:   inst.Domain,
		}
		if err := h.dhcp.UpsertLease(nic.Bridge, l); err != nil {
			errs = append(errs, fmt.Errorf("DHCP lease on %s: %w", nic.Bridge, err))
			continue
		}
		k := leaseKey{nic.Bridge, nic.MAC.String()}
		if old == nil || !slices.Contains(old.leases, k) {
			h.leases[nic.Bridge]++
		}
		now.leases = append(now.leases, k)
		z := h.zones[nic.Bridge]
		if z == nil {
			z = &dnsserver.Zone{Listen: nic.Gateway, Domain: inst.Domain, Records: map[string]netip.Addr{}}
			if err := h.dns.SetZone(nic.Bridge, h.zoneWithPeers(nic.Bridge, z)); err != nil {
				errs = append(errs, fmt.Errorf("DNS zone on %s: %w", nic.Bridge, err))
			}
			h.zones[nic.Bridge] = z
		}
		// DNS names are case-insensitive: one name, however spelled.
		n := nameKey{nic.Bridge, strings.ToLower(inst.Hostname)}
		if h.claims[n.bridge] == nil {
			h.claims[n.bridge] = map[string]map[string]netip.Addr{}
		}
		if h.claims[n.bridge][n.name] == nil {
			h.claims[n.bridge][n.name] = map[string]netip.Addr{}
		}
		h.claims[n.bridge][n.name][id] = nic.Address.Addr()
		now.names = append(now.names, n)
		if err := h.resolveLocked(n); err != nil {
			errs = append(errs, err)
		}
	}
	h.dropLocked(id, old, now)
	h.guests[id] = now
	return errors.Join(errs...)
}

// removeLocked stops serving one VM. h.mu must be held.
func (h *Services) removeLocked(id string) {
	old, ok := h.guests[id]
	if !ok {
		return
	}
	h.directory.Remove(id)
	h.dropLocked(id, old, &served{})
	delete(h.guests, id)
}

// dropLocked takes back the leases and names old held that now does not
// hold, and forgets a bridge left with no lease. h.mu must be held.
func (h *Services) dropLocked(id string, old, now *served) {
	if old == nil {
		return
	}
	for _, n := range old.names {
		if slices.Contains(now.names, n) {
			continue
		}
		delete(h.claims[n.bridge][n.name], id)
		_ = h.resolveLocked(n) // a removal cannot be refused
	}
	for _, k := range old.leases {
		if slices.Contains(now.leases, k) {
			continue
		}
		mac, _ := net.ParseMAC(k.mac)
		h.dhcp.RemoveLease(k.bridge, mac)
		if h.leases[k.bridge]--; h.leases[k.bridge] == 0 {
			delete(h.leases, k.bridge)
			delete(h.zones, k.bridge)
			delete(h.claims, k.bridge)
			h.dns.RemoveZone(k.bridge)
		}
	}
}

// resolveLocked serves the one address of a name: the local guest with
// the smallest id that claims it, else the network's peer, else none.
// h.mu must be held.
func (h *Services) resolveLocked(n nameKey) error {
	z := h.zones[n.bridge]
	if z == nil {
		return nil
	}
	winner, addr := "", netip.Addr{}
	for id, a := range h.claims[n.bridge][n.name] {
		if winner == "" || id < winner {
			winner, addr = id, a
		}
	}
	if winner == "" {
		delete(h.claims[n.bridge], n.name)
		delete(z.Records, n.name)
		if peer, ok := h.peers[n.bridge][n.name]; ok {
			return h.dns.SetRecord(n.bridge, n.name, peer)
		}
		h.dns.RemoveRecord(n.bridge, n.name)
		return nil
	}
	z.Records[n.name] = addr
	if err := h.dns.SetRecord(n.bridge, n.name, addr); err != nil {
		return fmt.Errorf("DNS record on %s: %w", n.bridge, err)
	}
	return nil
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
		peers[p.GetBridge()][strings.ToLower(p.GetHostname())] = ip
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
	out := make([]string, 0, len(h.leases))
	for b := range h.leases {
		out = append(out, b)
	}
	sort.Strings(out)
	return out
}
