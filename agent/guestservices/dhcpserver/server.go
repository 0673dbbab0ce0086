// Package dhcpserver is the agent's DHCPv4 server: it answers on each
// minicloud bridge, only for the MACs of this host's VMs on that bridge, with
// their fixed address and the network's settings. An unknown MAC gets no
// answer at all (and a log line), so a guest cannot learn addresses it was
// not given.
package dhcpserver

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"github.com/insomniacslk/dhcp/rfc1035label"
	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network"
)

// DefaultLeaseTime is used when a Lease leaves LeaseTime zero. Addresses are
// fixed for a VM's life, so the lease only bounds how long a guest keeps
// stale settings (DNS, MTU) after they change.
const DefaultLeaseTime = time.Hour

// resyncInterval bounds how long a missed link event can leave a bridge
// without a listener.
const resyncInterval = 10 * time.Second

// Lease is the fixed configuration of one VM NIC.
type Lease struct {
	MAC net.HardwareAddr
	// Address is the VM's address with the network's prefix length.
	Address netip.Prefix
	// Gateway is the router and the DHCP server identifier (it is the
	// bridge's address).
	Gateway netip.Addr
	// NoDefaultRoute is for a network that routes nowhere beyond its
	// subnet: the answer names no router, and a classless static route
	// (option 121) to the metadata address via Gateway keeps the metadata
	// service reachable. (With a router the default route already leads
	// there, and 121 is not sent: RFC 3442 makes a client that gets 121
	// ignore option 3, and not every client implements 121.)
	NoDefaultRoute bool
	// DNS servers; minicloud hands out the gateway.
	DNS []netip.Addr
	// MTU of the network (option 26); 0 leaves the guest's default.
	MTU      int
	Hostname string
	// Domain is the DNS domain (option 15) and the search domain (option
	// 119, which dhclient and systemd-networkd write to resolv.conf).
	Domain    string
	LeaseTime time.Duration
}

func (l Lease) validate() error {
	if len(l.MAC) != 6 {
		return fmt.Errorf("lease MAC %q is not an Ethernet address", l.MAC)
	}
	if !l.Address.IsValid() || !l.Address.Addr().Is4() {
		return fmt.Errorf("lease for %s: address %q is not IPv4 with a prefix length", l.MAC, l.Address)
	}
	if !l.Gateway.Is4() {
		return fmt.Errorf("lease for %s: gateway %q is not IPv4", l.MAC, l.Gateway)
	}
	return nil
}

// Server serves DHCPv4 on the bridges it has leases for. Create it with New,
// feed it with SetLeases (any time, from any goroutine) and call Run.
type Server struct {
	log *slog.Logger

	// mu guards leases. The packet handlers only read (a DHCP exchange
	// is rare next to the updates a filling host makes), and an update
	// touches one lease, never the whole table.
	mu     sync.RWMutex
	leases map[string]map[string]Lease // bridge -> MAC -> lease
	kick   chan struct{}

	listeners map[string]*listener // only touched by Run's goroutine

	servingMu sync.Mutex
	serving   map[string]bool // bridges with a bound listener
	changed   chan struct{}   // closed and replaced when serving changes
}

type listener struct {
	ifindex int
	srv     *server4.Server
	l2      *l2Sender
	done    chan struct{}
}

// Option configures a Server.
type Option func(*Server)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(log *slog.Logger) Option { return func(s *Server) { s.log = log } }

// New returns a Server with no leases.
func New(opts ...Option) *Server {
	s := &Server{
		leases:    map[string]map[string]Lease{},
		kick:      make(chan struct{}, 1),
		listeners: map[string]*listener{},
		serving:   map[string]bool{},
		changed:   make(chan struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	s.log = cmp.Or(s.log, slog.Default()).With("component", "dhcpserver")
	return s
}

// SetLeases atomically replaces the leases of one bridge; an empty list
// stops serving it. Invalid leases are skipped and reported in the error.
func (s *Server) SetLeases(bridge string, leases []Lease) error {
	byMAC := map[string]Lease{}
	var errs []error
	for _, l := range leases {
		if err := l.validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		l.MAC = slices.Clone(l.MAC)
		byMAC[l.MAC.String()] = l
	}
	s.mu.Lock()
	_, had := s.leases[bridge]
	if len(byMAC) == 0 {
		delete(s.leases, bridge)
	} else {
		s.leases[bridge] = byMAC
	}
	s.mu.Unlock()
	if had != (len(byMAC) > 0) {
		s.kickRun()
	}
	return errors.Join(errs...)
}

// UpsertLease adds or replaces the lease of one MAC on one bridge; the
// bridge's other leases are not touched.
func (s *Server) UpsertLease(bridge string, l Lease) error {
	if err := l.validate(); err != nil {
		return err
	}
	l.MAC = slices.Clone(l.MAC)
	s.mu.Lock()
	m, had := s.leases[bridge]
	if !had {
		m = map[string]Lease{}
		s.leases[bridge] = m
	}
	m[l.MAC.String()] = l
	s.mu.Unlock()
	if !had {
		s.kickRun()
	}
	return nil
}

// RemoveLease forgets the lease of one MAC on one bridge; the bridge's last
// lease gone, it is no longer served. Unknown ones are ignored.
func (s *Server) RemoveLease(bridge string, mac net.HardwareAddr) {
	s.mu.Lock()
	m, had := s.leases[bridge]
	delete(m, mac.String())
	last := had && len(m) == 0
	if last {
		delete(s.leases, bridge)
	}
	s.mu.Unlock()
	if last {
		s.kickRun()
	}
}

// Leases returns the leases of one bridge, sorted by MAC.
func (s *Server) Leases(bridge string) []Lease {
	s.mu.RLock()
	out := make([]Lease, 0, len(s.leases[bridge]))
	for _, l := range s.leases[bridge] {
		out = append(out, l)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b Lease) int { return bytes.Compare(a.MAC, b.MAC) })
	return out
}

// kickRun tells Run that the set of bridges to serve changed.
func (s *Server) kickRun() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Run serves until ctx ends. Listeners follow SetLeases and the bridges:
// a bridge that appears (or is re-created) gets a listener, one that goes
// away loses it.
func (s *Server) Run(ctx context.Context) error {
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			if ctx.Err() == nil { // closing the subscription on exit also reports an error
				s.log.Warn("link subscription", "err", err)
			}
		},
	}); err != nil {
		return fmt.Errorf("subscribe to link changes: %w", err)
	}
	tick := time.NewTicker(resyncInterval)
	defer tick.Stop()
	defer s.closeAll()
	for {
		s.reconcile()
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-tick.C:
		case _, ok := <-updates:
			if !ok {
				// The subscription died: fall back to the ticker.
				updates = nil
			}
		}
	}
}

// WaitServing blocks until the server listens on bridge, or ctx ends.
func (s *Server) WaitServing(ctx context.Context, bridge string) error {
	for {
		s.servingMu.Lock()
		on, ch := s.serving[bridge], s.changed
		s.servingMu.Unlock()
		if on {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("DHCP server not listening on %s: %w", bridge, ctx.Err())
		case <-ch:
		}
	}
}

func (s *Server) setServing(bridge string, on bool) {
	s.servingMu.Lock()
	defer s.servingMu.Unlock()
	if on {
		s.serving[bridge] = true
	} else {
		delete(s.serving, bridge)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) reconcile() {
	s.mu.RLock()
	snap := make(map[string]bool, len(s.leases))
	for b := range s.leases {
		snap[b] = true
	}
	s.mu.RUnlock()
	for bridge, l := range s.listeners {
		select {
		case <-l.done:
			delete(s.listeners, bridge) // its socket failed: reopen below
			s.setServing(bridge, false)
			continue
		default:
		}
		link, err := netlink.LinkByName(bridge)
		if _, wanted := snap[bridge]; !wanted || err != nil || link.Attrs().Index != l.ifindex {
			s.log.Info("stop serving", "bridge", bridge)
			_ = l.srv.Close()
			<-l.done
			delete(s.listeners, bridge)
			s.setServing(bridge, false)
		}
	}
	for bridge := range snap {
		if _, ok := s.listeners[bridge]; ok {
			continue
		}
		link, err := netlink.LinkByName(bridge)
		if err != nil {
			continue // not there yet: a link event or the ticker retries
		}
		l2, err := newL2Sender(link.Attrs().Index)
		if err != nil {
			s.log.Warn("cannot listen", "bridge", bridge, "err", err)
			continue
		}
		srv, err := server4.NewServer(bridge, nil, s.handler(bridge, l2))
		if err != nil {
			_ = l2.close()
			s.log.Warn("cannot listen", "bridge", bridge, "err", err)
			continue
		}
		l := &listener{ifindex: link.Attrs().Index, srv: srv, l2: l2, done: make(chan struct{})}
		s.listeners[bridge] = l
		s.setServing(bridge, true)
		s.log.Info("serving", "bridge", bridge)
		go func() {
			defer close(l.done)
			defer l.l2.close()
			_ = srv.Serve()
		}()
	}
}

func (s *Server) closeAll() {
	for bridge, l := range s.listeners {
		_ = l.srv.Close()
		<-l.done
		delete(s.listeners, bridge)
		s.setServing(bridge, false)
	}
}

func (s *Server) handler(bridge string, l2 *l2Sender) server4.Handler {
	return func(conn net.PacketConn, peer net.Addr, req *dhcpv4.DHCPv4) {
		reply := s.answer(bridge, req)
		if reply == nil {
			return
		}
		var err error
		switch {
		case req.ClientIPAddr != nil && !req.ClientIPAddr.IsUnspecified():
			// Renewal: the client has its address, plain unicast UDP works.
			_, err = conn.WriteTo(reply.ToBytes(), peer)
		default:
			// No address yet: to its MAC; to its address, or broadcast when
			// it asked (or for a NAK, RFC 2131 §4.1).
			dst := netip.IPv4Unspecified()
			if ip, ok := netip.AddrFromSlice(reply.YourIPAddr.To4()); ok {
				dst = ip
			}
			if req.IsBroadcast() || reply.MessageType() == dhcpv4.MessageTypeNak || dst.IsUnspecified() {
				dst = netip.AddrFrom4([4]byte{255, 255, 255, 255})
			}
			src, _ := netip.AddrFromSlice(reply.ServerIdentifier().To4())
			err = l2.send(req.ClientHWAddr, src, dst, reply.ToBytes())
		}
		if err != nil {
			s.log.Warn("send reply", "bridge", bridge, "mac", req.ClientHWAddr, "err", err)
		}
	}
}

// answer decides the reply to one request; nil means stay silent.
func (s *Server) answer(bridge string, req *dhcpv4.DHCPv4) *dhcpv4.DHCPv4 {
	if req.OpCode != dhcpv4.OpcodeBootRequest {
		return nil
	}
	if req.GatewayIPAddr != nil && !req.GatewayIPAddr.IsUnspecified() {
		return nil // minicloud bridges have no relay agents: a giaddr is forged
	}
	mac := req.ClientHWAddr.String()
	s.mu.RLock()
	lease, ok := s.leases[bridge][mac]
	s.mu.RUnlock()
	if !ok {
		s.log.Warn("no lease for MAC: not answering", "bridge", bridge, "mac", mac, "type", req.MessageType().String())
		return nil
	}
	gw := net.IP(lease.Gateway.AsSlice())
	var typ dhcpv4.MessageType
	switch req.MessageType() {
	case dhcpv4.MessageTypeDiscover:
		typ = dhcpv4.MessageTypeOffer
	case dhcpv4.MessageTypeRequest:
		if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(gw) {
			return nil // the client chose another server
		}
		want := req.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = req.ClientIPAddr
		}
		if !want.Equal(net.IP(lease.Address.Addr().AsSlice())) {
			s.log.Info("NAK: client asked for another address", "bridge", bridge, "mac", mac, "asked", want.String(), "lease", lease.Address.Addr())
			return reply(req, gw, dhcpv4.MessageTypeNak)
		}
		typ = dhcpv4.MessageTypeAck
	default:
		return nil // RELEASE, DECLINE, INFORM: addresses are fixed, nothing to do
	}
	r := reply(req, gw, typ)
	if r == nil {
		return nil
	}
	lt := lease.LeaseTime
	if lt <= 0 {
		lt = DefaultLeaseTime
	}
	r.YourIPAddr = lease.Address.Addr().AsSlice()
	r.UpdateOption(dhcpv4.OptSubnetMask(net.CIDRMask(lease.Address.Bits(), 32)))
	if lease.NoDefaultRoute {
		r.UpdateOption(dhcpv4.OptClasslessStaticRoute(&dhcpv4.Route{
			Dest:   &net.IPNet{IP: network.MetadataAddr.AsSlice(), Mask: net.CIDRMask(32, 32)},
			Router: gw,
		}))
	} else {
		r.UpdateOption(dhcpv4.OptRouter(gw))
	}
	r.UpdateOption(dhcpv4.OptIPAddressLeaseTime(lt))
	r.UpdateOption(dhcpv4.OptRenewTimeValue(lt / 2))
	r.UpdateOption(dhcpv4.OptRebindingTimeValue(lt * 7 / 8))
	if len(lease.DNS) > 0 {
		dns := make([]net.IP, 0, len(lease.DNS))
		for _, a := range lease.DNS {
			dns = append(dns, a.AsSlice())
		}
		r.UpdateOption(dhcpv4.OptDNS(dns...))
	}
	if lease.MTU > 0 {
		r.UpdateOption(dhcpv4.OptGeneric(dhcpv4.OptionInterfaceMTU, binary.BigEndian.AppendUint16(nil, uint16(lease.MTU))))
	}
	if lease.Hostname != "" {
		r.UpdateOption(dhcpv4.OptHostName(lease.Hostname))
	}
	if lease.Domain != "" {
		r.UpdateOption(dhcpv4.OptDomainName(lease.Domain))
		r.UpdateOption(dhcpv4.OptDomainSearch(&rfc1035label.Labels{Labels: []string{lease.Domain}}))
	}
	s.log.Debug("reply", "bridge", bridge, "mac", mac, "type", typ.String(), "ip", lease.Address.Addr())
	return r
}

func reply(req *dhcpv4.DHCPv4, server net.IP, typ dhcpv4.MessageType) *dhcpv4.DHCPv4 {
	r, err := dhcpv4.NewReplyFromRequest(req,
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(server),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server)),
	)
	if err != nil {
		return nil
	}
	return r
}
