package linux

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/network/networktest"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestPortForwardReachesGuest plays a host (a namespace) with one guest
// network and a client outside it (another namespace, on a link to the
// host, with no route to the guest network, inside a protected management
// network): the client reaches the guest's TCP and UDP services through
// the host's address and the forwarded ports, the guest sees the client's
// own address, the host reaches the forward too, and once the forward is
// removed the port is closed again.
func TestPortForwardReachesGuest(t *testing.T) {
	netnstest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	br, tap := networktest.Names()
	host := netnstest.NewNS(t, "mch-"+br)
	hostAddr := netip.MustParsePrefix("172.30.7.1/24")
	clientAddr := netip.MustParsePrefix("172.30.7.2/24")
	m := &inNS{ns: host, m: New(WithProtectedNets(hostAddr.Masked()))}

	nw := network.BridgeSpec{Name: br, GatewayCIDR: netip.MustParsePrefix("10.252.1.1/24"), NAT: true}
	if err := m.EnsureBridge(ctx, nw); err != nil {
		t.Fatal(err)
	}
	g := netnstest.NewGuestIn(t, host, tap(0), nil)
	gIP := netip.MustParseAddr("10.252.1.10")
	if err := m.EnsurePort(ctx, network.PortSpec{VMID: "vm-web", TapName: tap(0), Bridge: br, MAC: g.MAC, IP: gIP, Existing: true}); err != nil {
		t.Fatal(err)
	}
	if err := g.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.SetAddr(netip.PrefixFrom(gIP, 24), nw.GatewayCIDR.Addr()); err != nil {
		t.Fatal(err)
	}
	// The guest's services: a line naming the peer, over TCP and UDP.
	err := g.Do(func() error {
		l, err := net.Listen("tcp4", "0.0.0.0:80")
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "hello %s\n", c.RemoteAddr())
				c.Close()
			}
		}()
		u, err := net.ListenPacket("udp4", "0.0.0.0:53")
		if err != nil {
			return err
		}
		t.Cleanup(func() { u.Close() })
		go func() {
			buf := make([]byte, 512)
			for {
				n, from, err := u.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = u.WriteTo([]byte(fmt.Sprintf("udp %s %s", from, buf[:n])), from)
			}
		}()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// The client's link to the host: not a guest bridge, and the only
	// thing the client knows of the host.
	client := netnstest.NewGuestIn(t, host, "mcx-"+br[3:], nil)
	err = host.Do(func() error {
		l, err := netlink.LinkByName(client.HostIf)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: toIPNet(hostAddr)}); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := client.SetAddr(clientAddr, netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	ctxUp, cancelUp := context.WithTimeout(ctx, 10*time.Second)
	defer cancelUp()
	if err := client.WaitUp(ctxUp); err != nil {
		t.Fatal(err)
	}

	web := network.PortForward{VMID: "vm-web", Protocol: "tcp", HostPort: 20080, GuestIP: gIP, GuestPort: 80}
	dns := network.PortForward{VMID: "vm-web", Protocol: "udp", HostPort: 20053, GuestIP: gIP, GuestPort: 53}
	for _, f := range []network.PortForward{web, dns} {
		if err := m.EnsurePortForward(ctx, f); err != nil {
			t.Fatal(err)
		}
	}
	to := func(port uint16) string { return netip.AddrPortFrom(hostAddr.Addr(), port).String() }
	dial := func(ns *netnstest.NS, addr string) (line string, err error) {
		err = ns.Do(func() error {
			c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			line, err = bufio.NewReader(c).ReadString('\n')
			return err
		})
		return strings.TrimSpace(line), err
	}

	line, err := dial(client.NS, to(20080))
	if err != nil {
		t.Fatalf("client to %s: %v", to(20080), err)
	}
	if !strings.HasPrefix(line, "hello "+clientAddr.Addr().String()+":") {
		t.Fatalf("guest answered %q: want it to see the client's own address %s", line, clientAddr.Addr())
	}
	var got string
	err = client.Do(func() error {
		c, err := net.Dial("udp4", to(20053))
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		buf := make([]byte, 512)
		n, err := c.Read(buf)
		got = string(buf[:n])
		return err
	})
	if err != nil || !strings.HasPrefix(got, "udp "+clientAddr.Addr().String()+":") || !strings.HasSuffix(got, " ping") {
		t.Fatalf("UDP through %s: %q, %v", to(20053), got, err)
	}
	// The host itself, to its own address (OUTPUT).
	if line, err := dial(host, to(20080)); err != nil || !strings.HasPrefix(line, "hello ") {
		t.Fatalf("host to its own %s: %q, %v", to(20080), line, err)
	}
	// A port that is not forwarded is the host's own (nothing listens).
	if _, err := dial(client.NS, to(20081)); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("client to unforwarded %s: %v, want connection refused", to(20081), err)
	}
	if err := m.DeletePortForward(ctx, "tcp", 20080); err != nil {
		t.Fatal(err)
	}
	if _, err := dial(client.NS, to(20080)); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("client to %s after the forward was removed: %v, want connection refused", to(20080), err)
	}
	if err := m.DeletePortForward(ctx, "udp", 20053); err != nil {
		t.Fatal(err)
	}
}
