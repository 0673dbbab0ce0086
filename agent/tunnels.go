package agent

import (
	"context"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/minicloud/minicloud/agent/network"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/wait"
)

// Networks span hosts over VXLAN when the host has a tunnel address
// (Config.TunnelIP): each network the host has a VM on gets a VXLAN device
// on its bridge, and the agent programs it with the other hosts' ports of
// that network. Those come from the API's WatchNetworkPorts stream (the
// agent never reads etcd); every message is the complete set, so applying
// the latest one is all the agent ever does, after a reconnect or a restart
// alike.

// PeerDirectory is an optional capability of GuestServices: it is told
// every port (on any host) of the networks this host serves, so DNS answers
// for every VM of a network, not only this host's.
type PeerDirectory interface {
	SetNetworkPorts(ctx context.Context, ports []*minicloudv1.NetworkPort) error
}

// tunnelSpec is the tunnel of a network on this host, or nil when the host
// has no tunnel address or the network no VNI (made before VNIs).
func (a *Agent) tunnelSpec(addr *minicloudv1.VMAddress) *network.TunnelSpec {
	if !a.cfg.TunnelIP.IsValid() || addr.GetVni() == 0 {
		return nil
	}
	return &network.TunnelSpec{VNI: addr.GetVni(), Local: a.cfg.TunnelIP}
}

// checkTunnelMTU refuses a network whose packets cannot cross the
// underlay once encapsulated.
func (a *Agent) checkTunnelMTU(addr *minicloudv1.VMAddress, mtu int) error {
	if a.cfg.UnderlayMTU == 0 || mtu <= a.cfg.UnderlayMTU-network.VXLANOverhead {
		return nil
	}
	return Permanent("NetworkMTUTooLarge", errdefs.FailedPrecondition(
		"network %s has MTU %d but this host's underlay carries at most %d (MTU %d minus %d bytes of VXLAN): recreate the network with --mtu %d or raise the underlay MTU",
		addr.GetNetwork(), mtu, a.cfg.UnderlayMTU-network.VXLANOverhead, a.cfg.UnderlayMTU, network.VXLANOverhead, a.cfg.UnderlayMTU-network.VXLANOverhead))
}

// watchNetworkPorts follows the API's stream of network ports for as long
// as the agent runs, reconnecting with backoff.
func (a *Agent) watchNetworkPorts(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return nil
	case <-a.registered:
	}
	backoff := time.Second
	for ctx.Err() == nil {
		stream, err := a.hosts.WatchNetworkPorts(ctx, &minicloudv1.WatchNetworkPortsRequest{Host: a.cfg.HostName})
		for err == nil {
			var snap *minicloudv1.NetworkPortsSnapshot
			if snap, err = stream.Recv(); err == nil {
				backoff = time.Second
				a.setNetworkPorts(ctx, snap.GetPorts())
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		if err != io.EOF {
			a.log.Warn("network ports stream ended; watching again", "err", errdefs.FromGRPC(err), "in", backoff)
		}
		if !wait.Sleep(ctx, backoff) {
			return nil
		}
		backoff = min(backoff*2, 30*time.Second)
	}
	return nil
}

// setNetworkPorts records the latest set and applies it to every tunnel
// and to DNS.
func (a *Agent) setNetworkPorts(ctx context.Context, ports []*minicloudv1.NetworkPort) {
	a.tunnelMu.Lock()
	a.netPorts = ports
	bridges := make([]string, 0, len(a.tunnels))
	for b := range a.tunnels {
		bridges = append(bridges, b)
	}
	a.tunnelMu.Unlock()
	for _, b := range bridges {
		if err := a.applyRemotePorts(ctx, b); err != nil {
			a.log.Warn("program tunnel", "bridge", b, "err", err)
		}
	}
	if pd, ok := a.guest.(PeerDirectory); ok {
		if err := pd.SetNetworkPorts(ctx, ports); err != nil {
			a.log.Warn("update DNS with the network's other VMs", "err", err)
		}
	}
}

// applyRemotePorts programs the bridge's tunnel with the other hosts' ports
// of the latest set, and records the bridge as tunnelled so the next set
// reaches it too.
//
// The set is read and applied under one lock: a reconcile applying the set
// it read could otherwise land after the stream applied a newer one, and
// leave the tunnel stale until the next change.
func (a *Agent) applyRemotePorts(ctx context.Context, bridge string) error {
	a.tunnelMu.Lock()
	defer a.tunnelMu.Unlock()
	a.tunnels[bridge] = true
	var remote []network.RemotePort
	for _, p := range a.netPorts {
		if p.GetBridge() != bridge || p.GetHost() == a.cfg.HostName {
			continue
		}
		mac, err1 := net.ParseMAC(p.GetMac())
		ip, err2 := netip.ParseAddr(p.GetIp())
		vtep, err3 := netip.ParseAddr(p.GetTunnelIp())
		if err1 != nil || err2 != nil || err3 != nil {
			// A host without a tunnel address keeps its ports to itself.
			continue
		}
		remote = append(remote, network.RemotePort{MAC: mac, IP: ip, VTEP: vtep})
	}
	err := a.net.SetRemotePorts(ctx, bridge, remote)
	if errdefs.IsFailedPrecondition(err) {
		return nil // the bridge is gone (collected) or not yet made: its next ensure applies the set
	}
	return err
}

// forgetTunnel stops programming a bridge that was deleted.
func (a *Agent) forgetTunnel(bridge string) {
	a.tunnelMu.Lock()
	delete(a.tunnels, bridge)
	a.tunnelMu.Unlock()
}
