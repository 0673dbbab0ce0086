package linux

import (
	"context"
	"testing"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestConformance runs the network.Manager suite against the real kernel.
// Each subtest gets its own network namespace as "the host", so Sync (which
// deletes every minicloud port it was not given) never touches the machine's
// real bridges, nor those of tests running in parallel.
func TestConformance(t *testing.T) {
	netnstest.Require(t)
	networktest.RunConformance(t, func(t *testing.T) (network.Manager, func() network.Manager) {
		_, tap := networktest.Names()
		host := netnstest.NewNS(t, "mch-"+tap(0))
		mk := func() network.Manager { return &inNS{ns: host, m: New()} }
		return mk(), mk
	})
}

// inNS runs every call of a Manager inside a namespace.
type inNS struct {
	ns *netnstest.NS
	m  *Manager
}

func (n *inNS) EnsureBridge(ctx context.Context, s network.BridgeSpec) error {
	return n.ns.Do(func() error { return n.m.EnsureBridge(ctx, s) })
}

func (n *inNS) DeleteBridge(ctx context.Context, name string) error {
	return n.ns.Do(func() error { return n.m.DeleteBridge(ctx, name) })
}

func (n *inNS) ListBridges(ctx context.Context) (out []network.BridgeSpec, err error) {
	err = n.ns.Do(func() error { out, err = n.m.ListBridges(ctx); return err })
	return out, err
}

func (n *inNS) SetRemotePorts(ctx context.Context, bridge string, ports []network.RemotePort) error {
	return n.ns.Do(func() error { return n.m.SetRemotePorts(ctx, bridge, ports) })
}

func (n *inNS) EnsurePort(ctx context.Context, s network.PortSpec) error {
	return n.ns.Do(func() error { return n.m.EnsurePort(ctx, s) })
}

func (n *inNS) DeletePort(ctx context.Context, name string) error {
	return n.ns.Do(func() error { return n.m.DeletePort(ctx, name) })
}

func (n *inNS) ListPorts(ctx context.Context) (out []network.PortSpec, err error) {
	err = n.ns.Do(func() error { out, err = n.m.ListPorts(ctx); return err })
	return out, err
}

func (n *inNS) Sync(ctx context.Context, b []network.BridgeSpec, p []network.PortSpec) error {
	return n.ns.Do(func() error { return n.m.Sync(ctx, b, p) })
}

func (n *inNS) EnsurePortForward(ctx context.Context, f network.PortForward) error {
	return n.ns.Do(func() error { return n.m.EnsurePortForward(ctx, f) })
}

func (n *inNS) DeletePortForward(ctx context.Context, protocol string, hostPort uint16) error {
	return n.ns.Do(func() error { return n.m.DeletePortForward(ctx, protocol, hostPort) })
}

func (n *inNS) ListPortForwards(ctx context.Context) (out []network.PortForward, err error) {
	err = n.ns.Do(func() error { out, err = n.m.ListPortForwards(ctx); return err })
	return out, err
}
