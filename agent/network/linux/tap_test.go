package linux

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestTapIsWhatQEMUNeeds checks the kernel object EnsurePort leaves behind:
// a persistent single-queue tap owned by root, no packet info, vnet headers,
// a MAC of its own, marked as the VM's, on its bridge, up, with the
// bridge's address derived from its name.
func TestTapIsWhatQEMUNeeds(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	br, tap := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+br)
	m := &inNS{ns: host, m: New()}
	if err := m.EnsureBridge(ctx, network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.231.0.1/24"), MTU: 1400}); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC("52:54:00:aa:bb:cc")
	spec := network.PortSpec{VMID: "0f1e2d3c-vm", TapName: tap(0), Bridge: br, MAC: mac, IP: netip.MustParseAddr("10.231.0.7")}
	if err := m.EnsurePort(ctx, spec); err != nil {
		t.Fatal(err)
	}
	err := host.Do(func() error {
		l, err := netlink.LinkByName(tap(0))
		if err != nil {
			return err
		}
		tt, ok := l.(*netlink.Tuntap)
		if !ok {
			return fmt.Errorf("%s is a %s, want a tap", tap(0), l.Type())
		}
		switch {
		case tt.Mode != netlink.TUNTAP_MODE_TAP:
			t.Errorf("mode %v, want tap", tt.Mode)
		case tt.NonPersist:
			t.Error("tap is not persistent: it would vanish when its creator exits")
		case tt.Owner != 0 || tt.Group != 0:
			t.Errorf("owner %d group %d, want root", tt.Owner, tt.Group)
		case tt.Flags&netlink.TUNTAP_MULTI_QUEUE != 0:
			t.Error("multi-queue tap")
		case tt.Flags&netlink.TUNTAP_NO_PI == 0 || tt.Flags&netlink.TUNTAP_VNET_HDR == 0:
			t.Errorf("flags %v, want no_pi and vnet_hdr", tt.Flags)
		}
		a := l.Attrs()
		if a.HardwareAddr.String() != "fe:54:00:aa:bb:cc" {
			t.Errorf("tap MAC %s, want the guest's with fe", a.HardwareAddr)
		}
		if a.Alias != "minicloud:port vm=0f1e2d3c-vm" {
			t.Errorf("alias %q", a.Alias)
		}
		if a.MTU != 1400 || a.Flags&net.FlagUp == 0 {
			t.Errorf("MTU %d up %v, want 1400 and up", a.MTU, a.Flags&net.FlagUp != 0)
		}
		b, err := netlink.LinkByName(br)
		if err != nil {
			return err
		}
		if a.MasterIndex != b.Attrs().Index {
			t.Errorf("tap not on bridge %s", br)
		}
		if b.Attrs().HardwareAddr.String() != stableMAC(br).String() {
			t.Errorf("bridge MAC %s, want %s", b.Attrs().HardwareAddr, stableMAC(br))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
