package server

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// portsSettle is how long WatchNetworkPorts lets a burst of changes (a
// create writes spec, status and events) settle before it reads again.
const portsSettle = 100 * time.Millisecond

// WatchNetworkPorts streams the complete set of guest ports, on every host,
// of the networks the host has VMs on: at once, then again after each change
// that alters it. Each message replaces the previous one (level-triggered),
// so a reconnecting agent needs no resume token: the first message after
// reconnecting is the truth. Agents never read etcd; this is how they learn
// the other hosts' ports (for VXLAN forwarding entries) and names (for DNS).
//
// Each change re-reads the VMs and hosts: O(VMs) per change and stream,
// fine for the hundreds of VMs this cloud targets; a shared informer cache
// is the step beyond.
func (h *hostService) WatchNetworkPorts(req *minicloudv1.WatchNetworkPortsRequest, stream minicloudv1.HostService_WatchNetworkPortsServer) error {
	ctx := stream.Context()
	name := req.GetHost()
	// Only the host itself may follow its networks (its certificate, on a
	// TLS server): the set names other tenants' VMs on those networks.
	if err := h.authorizeRegisteredHost(ctx, name); err != nil {
		return err
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	defer context.AfterFunc(h.s.streams, cancel)()

	var last *minicloudv1.NetworkPortsSnapshot
	var vmw, hostw clientv3.WatchChan
	for {
		snap, rev, err := h.s.networkPorts(ctx, name)
		if err != nil {
			return err
		}
		if last == nil || !proto.Equal(&minicloudv1.NetworkPortsSnapshot{Ports: last.Ports}, &minicloudv1.NetworkPortsSnapshot{Ports: snap.Ports}) {
			if err := stream.Send(snap); err != nil {
				return err
			}
			last = snap
		}
		if vmw == nil {
			vmw = h.s.etcd.Watch(wctx, store.VMSpecPrefix, clientv3.WithRange(store.PrefixEnd(store.VMStatusPrefix)), clientv3.WithRev(rev+1))
			hostw = h.s.etcd.Watch(wctx, store.HostSpecPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		}
		// Wait for any change, let the burst settle, drain, read again.
		if err := waitChange(wctx, vmw, hostw); err != nil {
			return h.s.streamEnded(ctx, err)
		}
		timer := time.NewTimer(portsSettle)
		select {
		case <-wctx.Done():
			timer.Stop()
			return h.s.streamEnded(ctx, wctx.Err())
		case <-timer.C:
		}
		drain(vmw)
		drain(hostw)
	}
}

// waitChange blocks until either watch delivers events.
func waitChange(ctx context.Context, chans ...clientv3.WatchChan) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case resp, ok := <-chans[0]:
		return watchErr(resp, ok)
	case resp, ok := <-chans[1]:
		return watchErr(resp, ok)
	}
}

func watchErr(resp clientv3.WatchResponse, ok bool) error {
	if !ok {
		return errdefs.Unavailable("etcd watch closed")
	}
	if err := resp.Err(); err != nil {
		if errors.Is(err, rpctypes.ErrCompacted) {
			return errdefs.Conflict("watch fell behind etcd compaction: watch again")
		}
		return errdefs.Wrap(errdefs.KindUnavailable, err, "watch")
	}
	return nil
}

func drain(ch clientv3.WatchChan) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

// streamEnded turns the end of a watch into the error the client sees.
func (s *Server) streamEnded(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if s.streams.Err() != nil {
		return errdefs.Unavailable("API server is shutting down: watch again")
	}
	return err
}

// networkPorts computes a host's snapshot: every addressed port of every
// placed VM on the networks (bridges) where the host has a VM.
func (s *Server) networkPorts(ctx context.Context, host string) (*minicloudv1.NetworkPortsSnapshot, int64, error) {
	vms, vmRev, err := store.ListVMs(ctx, s.etcd, 0)
	if err != nil {
		return nil, 0, err
	}
	hosts, hostRev, err := store.List(ctx, s.etcd, store.HostSpecPrefix, func() *minicloudv1.Host { return &minicloudv1.Host{} })
	if err != nil {
		return nil, 0, err
	}
	tunnel := map[string]string{}
	for _, h := range hosts {
		tunnel[h.Value.GetMeta().GetName()] = h.Value.GetTunnelIp()
	}
	mine := map[string]bool{}
	for _, vm := range vms {
		if vm.GetStatus().GetHost() != host {
			continue
		}
		for _, a := range vm.GetStatus().GetAddresses() {
			mine[a.GetBridge()] = true
		}
	}
	snap := &minicloudv1.NetworkPortsSnapshot{Revision: min(vmRev, hostRev)}
	for _, vm := range vms {
		on := vm.GetStatus().GetHost()
		if on == "" {
			continue
		}
		hostname := cmp.Or(vm.GetSpec().GetHostname(), vm.GetMeta().GetName())
		for _, a := range vm.GetStatus().GetAddresses() {
			if !mine[a.GetBridge()] || a.GetIp() == "" || a.GetMac() == "" {
				continue
			}
			snap.Ports = append(snap.Ports, &minicloudv1.NetworkPort{
				VmId: vm.GetMeta().GetId(), VmName: vm.GetMeta().GetName(), Project: vm.GetMeta().GetProject(),
				Network: a.GetNetwork(), Bridge: a.GetBridge(), Vni: a.GetVni(),
				Mac: a.GetMac(), Ip: a.GetIp(), Host: on, TunnelIp: tunnel[on], Hostname: hostname,
			})
		}
	}
	slices.SortFunc(snap.Ports, func(a, b *minicloudv1.NetworkPort) int {
		return cmp.Or(cmp.Compare(a.GetBridge(), b.GetBridge()), cmp.Compare(a.GetIp(), b.GetIp()), cmp.Compare(a.GetVmId(), b.GetVmId()))
	})
	return snap, snap.Revision, nil
}
