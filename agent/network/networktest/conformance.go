// Package networktest is the behavioural contract of network.Manager: every
// implementation (the Linux one, any fake used for scale tests) runs
// RunConformance and must pass it.
package networktest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/nic"
)

// Factory returns a Manager over a host state that no other test touches
// (the Linux suite gives each subtest its own network namespace). Calling it
// twice within one test must give two Managers over the same host state, as
// an agent and its restarted successor.
type Factory func(t *testing.T) (first network.Manager, restarted func() network.Manager)

// RunConformance runs the suite against the implementation built by newManager.
func RunConformance(t *testing.T, newManager Factory) {
	tests := []struct {
		name string
		fn   func(t *testing.T, m network.Manager, restart func() network.Manager)
	}{
		{"BridgeIsIdempotent", testBridgeIdempotent},
		{"BridgeConverges", testBridgeConverges},
		{"PortIsIdempotent", testPortIdempotent},
		{"PortNeedsBridge", testPortNeedsBridge},
		{"PortChangesAddress", testPortChangesAddress},
		{"PortOfAnotherVM", testPortOfAnotherVM},
		{"InvalidSpecsCreateNothing", testInvalidSpecs},
		{"DeleteIsIdempotent", testDeleteIdempotent},
		{"RestartKeepsState", testRestartKeepsState},
		{"SyncConverges", testSyncConverges},
		{"TunnelConverges", testTunnelConverges},
		{"PortForwardConverges", testPortForwardConverges},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, restart := newManager(t)
			tc.fn(t, m, restart)
		})
	}
}

// Names returns a fresh bridge name and a tap name maker following the
// minicloud conventions, unique per call.
func Names() (bridge string, tap func(nic int) string) {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	h := hex.EncodeToString(b)
	return "mc-" + h, func(i int) string { return nic.TapName(h, i) }
}

func bridgeSpec(name string, gw string) network.BridgeSpec {
	return network.BridgeSpec{Name: name, GatewayCIDR: netip.MustParsePrefix(gw), MTU: 1450, NAT: true}
}

func portSpec(vm, tap, bridge string, mac string, ip string) network.PortSpec {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		panic(err)
	}
	return network.PortSpec{VMID: vm, TapName: tap, Bridge: bridge, MAC: hw, IP: netip.MustParseAddr(ip)}
}

func must(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func findBridge(t *testing.T, m network.Manager, name string) (network.BridgeSpec, bool) {
	t.Helper()
	bs, err := m.ListBridges(context.Background())
	must(t, err, "ListBridges")
	i := slices.IndexFunc(bs, func(b network.BridgeSpec) bool { return b.Name == name })
	if i < 0 {
		return network.BridgeSpec{}, false
	}
	return bs[i], true
}

func findPort(t *testing.T, m network.Manager, tap string) (network.PortSpec, bool) {
	t.Helper()
	ps, err := m.ListPorts(context.Background())
	must(t, err, "ListPorts")
	i := slices.IndexFunc(ps, func(p network.PortSpec) bool { return p.TapName == tap })
	if i < 0 {
		return network.PortSpec{}, false
	}
	return ps[i], true
}

func checkPort(t *testing.T, got network.PortSpec, want network.PortSpec) {
	t.Helper()
	if got.VMID != want.VMID || got.Bridge != want.Bridge || got.MAC.String() != want.MAC.String() || got.IP != want.IP {
		t.Errorf("port %s = {vm %s bridge %s mac %s ip %s}, want {vm %s bridge %s mac %s ip %s}", want.TapName,
			got.VMID, got.Bridge, got.MAC, got.IP, want.VMID, want.Bridge, want.MAC, want.IP)
	}
}

func testBridgeIdempotent(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, _ := Names()
	spec := bridgeSpec(br, "10.201.0.1/24")
	for i := 0; i < 2; i++ {
		must(t, m.EnsureBridge(ctx, spec), "EnsureBridge")
	}
	got, ok := findBridge(t, m, br)
	if !ok {
		t.Fatalf("bridge %s not listed after EnsureBridge", br)
	}
	if got.GatewayCIDR != spec.GatewayCIDR || got.MTU != spec.MTU || got.NAT != spec.NAT {
		t.Errorf("bridge = %+v, want %+v", got, spec)
	}
}

func testBridgeConverges(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, _ := Names()
	must(t, m.EnsureBridge(ctx, bridgeSpec(br, "10.202.0.1/24")), "EnsureBridge")
	changed := network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.203.0.1/16"), MTU: 1400, NAT: false}
	must(t, m.EnsureBridge(ctx, changed), "EnsureBridge with a new gateway, MTU and NAT off")
	got, _ := findBridge(t, m, br)
	if got.GatewayCIDR != changed.GatewayCIDR || got.MTU != changed.MTU || got.NAT {
		t.Errorf("bridge = %+v, want %+v", got, changed)
	}
}

func testPortIdempotent(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	must(t, m.EnsureBridge(ctx, bridgeSpec(br, "10.204.0.1/24")), "EnsureBridge")
	p := portSpec("vm-1", tap(0), br, "52:54:00:00:04:05", "10.204.0.5")
	for i := 0; i < 2; i++ {
		must(t, m.EnsurePort(ctx, p), "EnsurePort")
	}
	got, ok := findPort(t, m, p.TapName)
	if !ok {
		t.Fatalf("port %s not listed after EnsurePort", p.TapName)
	}
	checkPort(t, got, p)
	if got.MTU != 1450 {
		t.Errorf("port MTU = %d, want the bridge's 1450", got.MTU)
	}
}

func testPortNeedsBridge(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	p := portSpec("vm-1", tap(0), br, "52:54:00:00:04:06", "10.205.0.5")
	err := m.EnsurePort(ctx, p)
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("EnsurePort without its bridge = %v, want FailedPrecondition", err)
	}
	if _, ok := findPort(t, m, p.TapName); ok {
		t.Errorf("port %s exists after a refused EnsurePort", p.TapName)
	}
}

func testPortChangesAddress(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	must(t, m.EnsureBridge(ctx, bridgeSpec(br, "10.206.0.1/24")), "EnsureBridge")
	p := portSpec("vm-1", tap(0), br, "52:54:00:00:06:05", "10.206.0.5")
	must(t, m.EnsurePort(ctx, p), "EnsurePort")
	p2 := portSpec("vm-1", tap(0), br, "52:54:00:00:06:06", "10.206.0.6")
	must(t, m.EnsurePort(ctx, p2), "EnsurePort with a new MAC and IP")
	got, _ := findPort(t, m, p.TapName)
	checkPort(t, got, p2)
}

func testPortOfAnotherVM(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	must(t, m.EnsureBridge(ctx, bridgeSpec(br, "10.207.0.1/24")), "EnsureBridge")
	p := portSpec("vm-1", tap(0), br, "52:54:00:00:07:05", "10.207.0.5")
	must(t, m.EnsurePort(ctx, p), "EnsurePort")
	other := portSpec("vm-2", tap(0), br, "52:54:00:00:07:06", "10.207.0.6")
	if err := m.EnsurePort(ctx, other); !errdefs.IsConflict(err) {
		t.Fatalf("EnsurePort over VM vm-1's port = %v, want Conflict", err)
	}
	got, _ := findPort(t, m, p.TapName)
	checkPort(t, got, p)
}

func testInvalidSpecs(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	badBridges := []network.BridgeSpec{
		{Name: "", GatewayCIDR: netip.MustParsePrefix("10.1.0.1/24")},
		{Name: "this-name-is-far-too-long", GatewayCIDR: netip.MustParsePrefix("10.1.0.1/24")},
		{Name: br, GatewayCIDR: netip.MustParsePrefix("10.1.0.0/24")},
		{Name: br, GatewayCIDR: netip.MustParsePrefix("fd00::1/64")},
		{Name: br},
		{Name: br, GatewayCIDR: netip.MustParsePrefix("10.1.0.1/24"), MTU: 100},
	}
	for _, b := range badBridges {
		if err := m.EnsureBridge(ctx, b); !errdefs.IsInvalid(err) {
			t.Errorf("EnsureBridge(%+v) = %v, want Invalid", b, err)
		}
	}
	if _, ok := findBridge(t, m, br); ok {
		t.Errorf("bridge %s exists after invalid specs", br)
	}
	must(t, m.EnsureBridge(ctx, bridgeSpec(br, "10.208.0.1/24")), "EnsureBridge")
	ok := portSpec("vm-1", tap(0), br, "52:54:00:00:08:05", "10.208.0.5")
	bad := []func(p *network.PortSpec){
		func(p *network.PortSpec) { p.MAC = net.HardwareAddr{1, 0, 0, 0, 0, 1} },
		func(p *network.PortSpec) { p.MAC = nil },
		func(p *network.PortSpec) { p.IP = netip.Addr{} },
		func(p *network.PortSpec) { p.IP = network.MetadataAddr },
		func(p *network.PortSpec) { p.IP = netip.MustParseAddr("fd00::5") },
		func(p *network.PortSpec) { p.VMID = "" },
		func(p *network.PortSpec) { p.TapName = "bad name" },
		func(p *network.PortSpec) { p.TapName = "tap0" },                       // escapes the port filter
		func(p *network.PortSpec) { p.IP = netip.MustParseAddr("10.99.0.5") },  // outside the network
		func(p *network.PortSpec) { p.IP = netip.MustParseAddr("10.208.0.1") }, // the gateway
		func(p *network.PortSpec) { p.IP = netip.MustParseAddr("10.208.0.255") },
	}
	for i, mutate := range bad {
		p := ok
		mutate(&p)
		if err := m.EnsurePort(ctx, p); !errdefs.IsInvalid(err) {
			t.Errorf("invalid port %d (%+v) = %v, want Invalid", i, p, err)
		}
	}
	if _, found := findPort(t, m, ok.TapName); found {
		t.Errorf("port %s exists after invalid specs", ok.TapName)
	}
}

func testDeleteIdempotent(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	must(t, m.EnsureBridge(ctx, bridgeSpec(br, "10.209.0.1/24")), "EnsureBridge")
	p := portSpec("vm-1", tap(0), br, "52:54:00:00:09:05", "10.209.0.5")
	must(t, m.EnsurePort(ctx, p), "EnsurePort")
	for i := 0; i < 2; i++ {
		must(t, m.DeletePort(ctx, p.TapName), "DeletePort")
	}
	if _, ok := findPort(t, m, p.TapName); ok {
		t.Errorf("port %s listed after DeletePort", p.TapName)
	}
	for i := 0; i < 2; i++ {
		must(t, m.DeleteBridge(ctx, br), "DeleteBridge")
	}
	if _, ok := findBridge(t, m, br); ok {
		t.Errorf("bridge %s listed after DeleteBridge", br)
	}
}

func testRestartKeepsState(t *testing.T, m network.Manager, restart func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	b := bridgeSpec(br, "10.210.0.1/24")
	must(t, m.EnsureBridge(ctx, b), "EnsureBridge")
	p := portSpec("vm-1", tap(0), br, "52:54:00:00:10:05", "10.210.0.5")
	must(t, m.EnsurePort(ctx, p), "EnsurePort")

	m2 := restart()
	got, ok := findPort(t, m2, p.TapName)
	if !ok {
		t.Fatalf("restarted manager does not see port %s", p.TapName)
	}
	checkPort(t, got, p)
	must(t, m2.Sync(ctx, []network.BridgeSpec{b}, []network.PortSpec{p}), "Sync after restart")
	got, _ = findPort(t, m2, p.TapName)
	checkPort(t, got, p)
}

func testSyncConverges(t *testing.T, m network.Manager, _ func() network.Manager) {
	ctx := context.Background()
	br, tap := Names()
	gone, goneTap := Names()
	b := bridgeSpec(br, "10.211.0.1/24")
	keep := portSpec("vm-1", tap(0), br, "52:54:00:00:11:05", "10.211.0.5")
	drop := portSpec("vm-2", tap(1), br, "52:54:00:00:11:06", "10.211.0.6")
	must(t, m.EnsureBridge(ctx, b), "EnsureBridge")
	must(t, m.EnsureBridge(ctx, bridgeSpec(gone, "10.212.0.1/24")), "EnsureBridge")
	must(t, m.EnsurePort(ctx, drop), "EnsurePort")
	must(t, m.EnsurePort(ctx, portSpec("vm-3", goneTap(0), gone, "52:54:00:00:12:05", "10.212.0.5")), "EnsurePort")

	must(t, m.Sync(ctx, []network.BridgeSpec{b}, []network.PortSpec{keep}), "Sync")
	ps, err := m.ListPorts(ctx)
	must(t, err, "ListPorts")
	if len(ps) != 1 {
		t.Fatalf("ports after Sync = %+v, want only %s", ps, keep.TapName)
	}
	checkPort(t, ps[0], keep)
	bs, err := m.ListBridges(ctx)
	must(t, err, "ListBridges")
	if len(bs) != 1 || bs[0].Name != br {
		t.Fatalf("bridges after Sync = %+v, want only %s", bs, br)
	}
}

// testTunnelConverges: a bridge's tunnel appears, changes VNI and goes
// with its spec; remote ports need a tunnel and valid addresses.
func testTunnelConverges(t *testing.T, m network.Manager, restart func() network.Manager) {
	ctx := context.Background()
	br, _ := Names()
	spec := bridgeSpec(br, "10.31.0.1/24")
	must(t, m.EnsureBridge(ctx, spec), "ensure bridge without tunnel")
	remote := []network.RemotePort{{MAC: net.HardwareAddr{0x52, 0x54, 0, 1, 2, 3}, IP: netip.MustParseAddr("10.31.0.20"), VTEP: netip.MustParseAddr("192.0.2.2")}}
	if err := m.SetRemotePorts(ctx, br, remote); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("remote ports on a bridge without tunnel: %v, want FailedPrecondition", err)
	}
	spec.Tunnel = &network.TunnelSpec{VNI: 4242, Local: netip.MustParseAddr("192.0.2.1")}
	must(t, m.EnsureBridge(ctx, spec), "add tunnel")
	must(t, m.EnsureBridge(ctx, spec), "add tunnel again")
	tunnelIs := func(m network.Manager, want *network.TunnelSpec) {
		t.Helper()
		got, ok := findBridge(t, m, br)
		if !ok {
			t.Fatalf("bridge %s missing", br)
		}
		if (got.Tunnel == nil) != (want == nil) || want != nil && *got.Tunnel != *want {
			t.Fatalf("tunnel %+v, want %+v", got.Tunnel, want)
		}
	}
	tunnelIs(m, spec.Tunnel)
	must(t, m.SetRemotePorts(ctx, br, remote), "set remote ports")
	must(t, m.SetRemotePorts(ctx, br, remote), "set remote ports again")
	bad := []network.RemotePort{{MAC: net.HardwareAddr{0x01, 0, 0, 0, 0, 1}, IP: netip.MustParseAddr("10.31.0.21"), VTEP: netip.MustParseAddr("192.0.2.2")}}
	if err := m.SetRemotePorts(ctx, br, bad); !errdefs.IsInvalid(err) {
		t.Fatalf("multicast remote MAC: %v, want Invalid", err)
	}
	tunnelIs(restart(), spec.Tunnel)
	spec.Tunnel = &network.TunnelSpec{VNI: 4243, Local: netip.MustParseAddr("192.0.2.1")}
	must(t, m.EnsureBridge(ctx, spec), "change VNI")
	tunnelIs(m, spec.Tunnel)
	must(t, m.SetRemotePorts(ctx, br, nil), "clear remote ports")
	badSpec := spec
	badSpec.Tunnel = &network.TunnelSpec{VNI: network.MaxVNI + 1, Local: netip.MustParseAddr("192.0.2.1")}
	if err := m.EnsureBridge(ctx, badSpec); !errdefs.IsInvalid(err) {
		t.Fatalf("VNI out of range: %v, want Invalid", err)
	}
	spec.Tunnel = nil
	must(t, m.EnsureBridge(ctx, spec), "remove tunnel")
	tunnelIs(m, nil)
	if err := m.SetRemotePorts(ctx, br, remote); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("remote ports after the tunnel went: %v, want FailedPrecondition", err)
	}
	must(t, m.DeleteBridge(ctx, br), "delete bridge")
}

func testPortForwardConverges(t *testing.T, m network.Manager, restart func() network.Manager) {
	ctx := context.Background()
	web := network.PortForward{VMID: "vm-a", Protocol: "tcp", HostPort: 20080, GuestIP: netip.MustParseAddr("10.201.5.10"), GuestPort: 80}
	dns := network.PortForward{VMID: "vm-a", Protocol: "udp", HostPort: 20080, GuestIP: netip.MustParseAddr("10.201.5.10"), GuestPort: 53}
	list := func(m network.Manager) []network.PortForward {
		t.Helper()
		fs, err := m.ListPortForwards(ctx)
		must(t, err, "ListPortForwards")
		return fs
	}
	if fs := list(m); len(fs) != 0 {
		t.Fatalf("forwards on a fresh host: %v", fs)
	}
	for range 2 {
		must(t, m.EnsurePortForward(ctx, web), "EnsurePortForward tcp")
	}
	must(t, m.EnsurePortForward(ctx, dns), "EnsurePortForward udp (same port number, other protocol)")
	if fs := list(m); !slices.Equal(fs, []network.PortForward{web, dns}) {
		t.Fatalf("forwards = %v, want %v", fs, []network.PortForward{web, dns})
	}
	// The same VM's forward to another port replaces the first.
	moved := web
	moved.GuestPort, moved.GuestIP = 8080, netip.MustParseAddr("10.201.5.11")
	must(t, m.EnsurePortForward(ctx, moved), "EnsurePortForward new target")
	// Another VM may not take the host port.
	other := web
	other.VMID = "vm-b"
	if err := m.EnsurePortForward(ctx, other); !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), "vm-a") {
		t.Fatalf("another VM's forward of a taken port: %v, want ALREADY_EXISTS naming vm-a", err)
	}
	// Restart: the kernel state stays.
	m2 := restart()
	if fs := list(m2); !slices.Equal(fs, []network.PortForward{moved, dns}) {
		t.Fatalf("after restart forwards = %v, want %v", fs, []network.PortForward{moved, dns})
	}
	for range 2 {
		must(t, m2.DeletePortForward(ctx, "tcp", 20080), "DeletePortForward")
	}
	if fs := list(m2); !slices.Equal(fs, []network.PortForward{dns}) {
		t.Fatalf("after delete forwards = %v, want %v", fs, []network.PortForward{dns})
	}
	must(t, m2.DeletePortForward(ctx, "udp", 20080), "DeletePortForward udp")
	for _, bad := range []network.PortForward{
		{Protocol: "tcp", HostPort: 1, GuestIP: web.GuestIP, GuestPort: 1},
		{VMID: "v", Protocol: "sctp", HostPort: 1, GuestIP: web.GuestIP, GuestPort: 1},
		{VMID: "v", Protocol: "tcp", HostPort: 0, GuestIP: web.GuestIP, GuestPort: 1},
		{VMID: "v", Protocol: "tcp", HostPort: 1, GuestIP: netip.MustParseAddr("127.0.0.1"), GuestPort: 1},
		{VMID: "v", Protocol: "tcp", HostPort: 1, GuestIP: network.MetadataAddr, GuestPort: 1},
	} {
		if err := m2.EnsurePortForward(ctx, bad); !errdefs.IsInvalid(err) {
			t.Errorf("EnsurePortForward(%+v) = %v, want INVALID_ARGUMENT", bad, err)
		}
	}
	if fs := list(m2); len(fs) != 0 {
		t.Fatalf("forwards left: %v", fs)
	}
}
