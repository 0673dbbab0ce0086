// Package linuxtest builds real guest networks for tests: a minicloud bridge
// made by the Linux network.Manager on this host, with network-namespace
// guests whose veth ports carry exactly the filtering a VM's tap gets. Names
// and subnets are random so tests (and other engineers' tests) can run side
// by side; everything is removed by t.Cleanup.
package linuxtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/linux"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// Network is one guest network on this host.
type Network struct {
	Manager *linux.Manager
	Bridge  network.BridgeSpec
	// ID is the random hex shared by the bridge and its port names.
	ID     string
	guests int
}

// Guest is a namespace guest plugged into a Network through a filtered port.
type Guest struct {
	*netnstest.Guest
	Port network.PortSpec
}

// NewNetwork creates a bridge "mc-<8 hex>" with a random 10.240-255.x.0/24
// subnet, gateway .1, MTU 1500 and NAT on.
func NewNetwork(t testing.TB) *Network {
	t.Helper()
	netnstest.Require(t)
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b[:4])
	gw := netip.AddrFrom4([4]byte{10, 240 + b[4]%16, b[5], 1})
	n := &Network{
		Manager: linux.New(),
		ID:      id,
		Bridge:  network.BridgeSpec{Name: "mc-" + id, GatewayCIDR: netip.PrefixFrom(gw, 24), MTU: 1500, NAT: true},
	}
	if err := n.Manager.EnsureBridge(context.Background(), n.Bridge); err != nil {
		t.Fatalf("create bridge: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Manager.DeleteBridge(context.Background(), n.Bridge.Name); err != nil {
			t.Errorf("delete bridge %s: %v", n.Bridge.Name, err)
		}
	})
	return n
}

// Gateway is the bridge's address.
func (n *Network) Gateway() netip.Addr { return n.Bridge.GatewayCIDR.Addr() }

// AddrOf returns the address of guest number i (.10 + i).
func (n *Network) AddrOf(i int) netip.Addr {
	a := n.Gateway().As4()
	a[3] = byte(10 + i)
	return netip.AddrFrom4(a)
}

// AddGuest creates the next namespace guest and its port ("mct<id><i>"),
// registered with the guest's MAC and address AddrOf(i). The guest's eth0
// is up but unconfigured: use DHCP or Configure.
func (n *Network) AddGuest(t testing.TB) *Guest {
	t.Helper()
	i := n.guests
	n.guests++
	tap := fmt.Sprintf("%s%s%x", network.PortPrefix, n.ID, i)
	g := &Guest{Guest: netnstest.NewGuest(t, tap, nil)}
	g.Port = network.PortSpec{
		VMID: fmt.Sprintf("vm-%s-%d", n.ID, i), TapName: tap, Bridge: n.Bridge.Name,
		MAC: g.MAC, IP: n.AddrOf(i), Existing: true,
	}
	if err := n.Manager.EnsurePort(context.Background(), g.Port); err != nil {
		t.Fatalf("adopt port %s: %v", tap, err)
	}
	t.Cleanup(func() {
		if err := n.Manager.DeletePort(context.Background(), tap); err != nil {
			t.Errorf("delete port %s: %v", tap, err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := g.WaitUp(ctx); err != nil {
		t.Fatalf("guest %s: %v", tap, err)
	}
	return g
}

// Configure gives the guest its address statically (no DHCP).
func (n *Network) Configure(g *Guest) error {
	return g.SetAddr(netip.PrefixFrom(g.Port.IP, n.Bridge.GatewayCIDR.Bits()), n.Gateway())
}
