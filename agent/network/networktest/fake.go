package networktest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// FakeHost is the in-memory "kernel" of a FakeManager: share one between
// several FakeManagers to play an agent restart.
type FakeHost struct {
	mu      sync.Mutex
	bridges map[string]network.BridgeSpec
	ports   map[string]network.PortSpec
	// remote holds each tunnelled bridge's remote ports.
	remote map[string][]network.RemotePort
	// routes are the host's own routes (SetRoutes), by destination.
	routes map[netip.Prefix]string
	// forwards by protocol and host port.
	forwards map[fwdKey]network.PortForward
}

type fwdKey struct {
	protocol string
	port     uint16
}

// SetRoutes sets the host's own routes (destination → device) that a new
// bridge may not overlap, as the kernel's routing table does for the real
// manager.
func (h *FakeHost) SetRoutes(routes map[netip.Prefix]string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.routes = routes
}

// NewFakeHost returns an empty host.
func NewFakeHost() *FakeHost {
	return &FakeHost{bridges: map[string]network.BridgeSpec{}, ports: map[string]network.PortSpec{}, remote: map[string][]network.RemotePort{}, forwards: map[fwdKey]network.PortForward{}}
}

// FakeManager is an in-memory network.Manager for scale tests (hundreds of
// simulated hosts), where real bridges cannot be made. It passes
// RunConformance; it filters no traffic.
type FakeManager struct {
	host *FakeHost
}

var _ network.Manager = (*FakeManager)(nil)

// NewFakeManager returns a FakeManager over host.
func NewFakeManager(host *FakeHost) *FakeManager { return &FakeManager{host: host} }

// EnsureBridge implements network.Manager.
func (f *FakeManager) EnsureBridge(_ context.Context, spec network.BridgeSpec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if spec.MTU == 0 {
		spec.MTU = 1500
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	if _, exists := f.host.bridges[spec.Name]; !exists {
		for dst, dev := range f.host.routes {
			if dst.Overlaps(spec.GatewayCIDR.Masked()) {
				return &network.HostConflictError{CIDR: spec.GatewayCIDR.Masked(), Route: dst, Via: "dev " + dev}
			}
		}
	}
	f.host.bridges[spec.Name] = spec
	if spec.Tunnel == nil {
		delete(f.host.remote, spec.Name)
	}
	return nil
}

// SetRemotePorts implements network.Manager.
func (f *FakeManager) SetRemotePorts(_ context.Context, bridge string, ports []network.RemotePort) error {
	if err := network.ValidateIfName("bridge", bridge); err != nil {
		return err
	}
	for _, p := range ports {
		if err := p.Validate(); err != nil {
			return fmt.Errorf("bridge %s: %w", bridge, err)
		}
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	if b, ok := f.host.bridges[bridge]; !ok || b.Tunnel == nil {
		return errdefs.FailedPrecondition("bridge %s has no tunnel; ensure the network with a tunnel first", bridge)
	}
	f.host.remote[bridge] = slices.Clone(ports)
	return nil
}

// RemotePorts reports what SetRemotePorts last set on bridge (for tests).
func (f *FakeManager) RemotePorts(bridge string) []network.RemotePort {
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	return slices.Clone(f.host.remote[bridge])
}

// DeleteBridge implements network.Manager; ports stay, detached.
func (f *FakeManager) DeleteBridge(_ context.Context, name string) error {
	if err := network.ValidateIfName("bridge", name); err != nil {
		return err
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	delete(f.host.bridges, name)
	delete(f.host.remote, name)
	for k, p := range f.host.ports {
		if p.Bridge == name {
			p.Bridge = ""
			f.host.ports[k] = p
		}
	}
	return nil
}

// ListBridges implements network.Manager.
func (f *FakeManager) ListBridges(context.Context) ([]network.BridgeSpec, error) {
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	out := make([]network.BridgeSpec, 0, len(f.host.bridges))
	for _, b := range f.host.bridges {
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b network.BridgeSpec) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// EnsurePort implements network.Manager.
func (f *FakeManager) EnsurePort(_ context.Context, spec network.PortSpec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	br, ok := f.host.bridges[spec.Bridge]
	if !ok {
		return errdefs.FailedPrecondition("port %s: bridge %s does not exist; ensure the network first", spec.TapName, spec.Bridge)
	}
	if err := br.CheckGuestIP(spec.IP); err != nil {
		return fmt.Errorf("port %s: %w", spec.TapName, err)
	}
	if old, ok := f.host.ports[spec.TapName]; ok && old.VMID != spec.VMID {
		return errdefs.Conflict("port %s belongs to VM %s, not %s", spec.TapName, old.VMID, spec.VMID)
	}
	if spec.MTU == 0 {
		spec.MTU = br.MTU
	}
	spec.MAC = slices.Clone(spec.MAC)
	f.host.ports[spec.TapName] = spec
	return nil
}

// DeletePort implements network.Manager.
func (f *FakeManager) DeletePort(_ context.Context, tapName string) error {
	if err := network.ValidateIfName("port", tapName); err != nil {
		return err
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	delete(f.host.ports, tapName)
	return nil
}

// ListPorts implements network.Manager.
func (f *FakeManager) ListPorts(context.Context) ([]network.PortSpec, error) {
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	out := make([]network.PortSpec, 0, len(f.host.ports))
	for _, p := range f.host.ports {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b network.PortSpec) int { return strings.Compare(a.TapName, b.TapName) })
	return out, nil
}

// EnsurePortForward implements network.Manager.
func (f *FakeManager) EnsurePortForward(_ context.Context, fwd network.PortForward) error {
	if err := fwd.Validate(); err != nil {
		return err
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	k := fwdKey{fwd.Protocol, fwd.HostPort}
	if old, ok := f.host.forwards[k]; ok && old.VMID != fwd.VMID {
		return errdefs.AlreadyExists("host port %d/%s is forwarded to VM %s on this host", fwd.HostPort, fwd.Protocol, old.VMID)
	}
	f.host.forwards[k] = fwd
	return nil
}

// DeletePortForward implements network.Manager.
func (f *FakeManager) DeletePortForward(_ context.Context, protocol string, hostPort uint16) error {
	if err := network.ValidateProtocol(protocol); err != nil {
		return err
	}
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	delete(f.host.forwards, fwdKey{protocol, hostPort})
	return nil
}

// ListPortForwards implements network.Manager.
func (f *FakeManager) ListPortForwards(context.Context) ([]network.PortForward, error) {
	f.host.mu.Lock()
	defer f.host.mu.Unlock()
	out := make([]network.PortForward, 0, len(f.host.forwards))
	for _, fwd := range f.host.forwards {
		out = append(out, fwd)
	}
	slices.SortFunc(out, func(a, b network.PortForward) int {
		if c := strings.Compare(a.Protocol, b.Protocol); c != 0 {
			return c
		}
		return int(a.HostPort) - int(b.HostPort)
	})
	return out, nil
}

// Sync implements network.Manager.
func (f *FakeManager) Sync(ctx context.Context, bridges []network.BridgeSpec, ports []network.PortSpec) error {
	var errs []error
	wantB, wantP := map[string]bool{}, map[string]bool{}
	for _, b := range bridges {
		wantB[b.Name] = true
		errs = append(errs, f.EnsureBridge(ctx, b))
	}
	for _, p := range ports {
		wantP[p.TapName] = true
		errs = append(errs, f.EnsurePort(ctx, p))
	}
	have, _ := f.ListPorts(ctx)
	for _, p := range have {
		if !wantP[p.TapName] {
			errs = append(errs, f.DeletePort(ctx, p.TapName))
		}
	}
	haveB, _ := f.ListBridges(ctx)
	for _, b := range haveB {
		if !wantB[b.Name] {
			errs = append(errs, f.DeleteBridge(ctx, b.Name))
		}
	}
	return errors.Join(errs...)
}
