package server

import (
	"context"
	"net"
	"net/netip"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// A guest network is routed by every host that carries it: its bridge
// takes the network's gateway and a connected route. A network that
// overlaps the machines' own networks would divert their traffic to the
// guests — a host would lose its way to the API, to etcd or to the other
// hosts, and a guest could answer in their place. validateNetwork refuses
// what is never a guest network (loopback, link-local, multicast); the
// ranges below depend on the installation.

// refuseReserved refuses a prefix overlapping one the operator reserved
// (Config.ReservedCIDRs: the management and underlay networks).
func (s *Server) refuseReserved(p netip.Prefix) error {
	for _, r := range s.reserved {
		if r.Overlaps(p) {
			return errdefs.Invalid("cidr %s overlaps %s, reserved by the operator for the machines' own networks (minicloudd api --reserved-cidr): choose a disjoint range", p, r)
		}
	}
	return nil
}

// refuseHostAddresses refuses a prefix containing a registered host's
// agent or tunnel (underlay) address, and returns the revision the hosts
// were read at, so the network is written only if no host registered
// since.
func (s *Server) refuseHostAddresses(ctx context.Context, p netip.Prefix) (int64, error) {
	hosts, rev, err := store.List(ctx, s.etcd, store.HostSpecPrefix, func() *minicloudv1.Host { return &minicloudv1.Host{} })
	if err != nil {
		return 0, err
	}
	for _, h := range hosts {
		for _, a := range hostAddresses(h.Value) {
			if p.Contains(a.addr) {
				return 0, errdefs.FailedPrecondition("cidr %s contains %s, the %s of host %s: the host would route its own traffic to the guests; choose a disjoint range", p, a.addr, a.what, h.Value.GetMeta().GetName())
			}
		}
	}
	return rev, nil
}

type hostAddr struct {
	addr netip.Addr
	what string
}

// hostAddresses are the IP addresses a host registered: its agent's
// (a name is not resolved: the API does not know what the hosts resolve)
// and its tunnel endpoint.
func hostAddresses(h *minicloudv1.Host) []hostAddr {
	var out []hostAddr
	if host, _, err := net.SplitHostPort(h.GetAddress()); err == nil {
		if a, err := netip.ParseAddr(host); err == nil {
			out = append(out, hostAddr{a.Unmap(), "agent address"})
		}
	}
	if a, err := netip.ParseAddr(h.GetTunnelIp()); err == nil {
		out = append(out, hostAddr{a.Unmap(), "tunnel (underlay) address"})
	}
	return out
}
