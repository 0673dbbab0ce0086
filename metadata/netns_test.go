package metadata

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/minicloud/minicloud/pkg/netnstest"
)

// metadataIP is where guests find the service.
var metadataIP = netip.MustParseAddr("169.254.169.254")

// realNet is a bridge carrying 169.254.169.254/32 and a gateway address,
// with network-namespace guests on veths, served by a real Server bound to
// the bridge.
type realNet struct {
	bridge string
	srv    *Server
	dir    *Directory
}

func newRealNet(t *testing.T) *realNet {
	t.Helper()
	netnstest.Require(t)
	suffix := strings.ReplaceAll(netnstest.RandomMAC().String(), ":", "")[6:]
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "mcmd" + suffix}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatalf("create bridge: %v", err)
	}
	t.Cleanup(func() {
		// By name: a test may have re-created the bridge.
		l, err := netlink.LinkByName(br.Name)
		if err == nil {
			err = netlink.LinkDel(l)
		}
		if err != nil {
			t.Errorf("delete bridge %s: %v", br.Name, err)
		}
	})
	dir := NewDirectory()
	srv, err := NewServer(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close server: %v", err)
		}
	})
	// The listener comes first, the address after (IP_FREEBIND): the
	// agent need not order the two.
	if err := srv.AddInterface(br.Name); err != nil {
		t.Fatal(err)
	}
	configureBridge(t, br.Name)
	return &realNet{bridge: br.Name, srv: srv, dir: dir}
}

// configureBridge puts the metadata and gateway addresses on a bridge and
// brings it up.
func configureBridge(t *testing.T, name string) {
	t.Helper()
	br, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"169.254.169.254/32", "10.99.0.1/24"} {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.AddrAdd(br, addr); err != nil {
			t.Fatalf("add %s to %s: %v", a, name, err)
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
}

// guest makes a namespace guest on the bridge with address ip/24.
func (n *realNet) guest(t *testing.T, name string, ip string) *netnstest.Guest {
	t.Helper()
	g := netnstest.NewGuest(t, name+n.bridge[4:], nil)
	if err := g.AttachToBridge(n.bridge); err != nil {
		t.Fatal(err)
	}
	if err := g.SetAddr(netip.MustParsePrefix(ip+"/24"), netip.MustParseAddr("10.99.0.1")); err != nil {
		t.Fatal(err)
	}
	return g
}

func (n *realNet) instanceFor(id, name string, g *netnstest.Guest, ip string) *Instance {
	inst := testInstance(id, name, ip, g.MAC.String())
	inst.Interfaces[0].Bridge = n.bridge
	inst.Interfaces[0].Gateway = netip.MustParseAddr("10.99.0.1")
	return inst
}

// nsClient is an HTTP client whose sockets live in namespace ns.
func nsClient(ns interface{ Do(func() error) error }) *http.Client {
	return &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := ns.Do(func() (err error) {
					var d net.Dialer
					c, err = d.DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
}

func nsDo(t *testing.T, c *http.Client, ctx context.Context, method, path string, hdr map[string]string) (int, string, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, "http://169.254.169.254"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// TestRealNetworkIdentity: guests on a real bridge each read their own
// metadata, by source address and MAC, and nobody else's.
func TestRealNetworkIdentity(t *testing.T) {
	n := newRealNet(t)
	ga := n.guest(t, "a", "10.99.0.5")
	gb := n.guest(t, "b", "10.99.0.6")
	gc := n.guest(t, "c", "10.99.0.7")
	gd := n.guest(t, "d", "10.99.0.8")
	// D's address is known, but under another MAC: refused.
	impostor := n.instanceFor("0d1b2c3d-0000-4000-8000-00000000000d", "web4", gd, "10.99.0.8")
	impostor.Interfaces[0].MAC = mustMAC("02:00:00:00:00:01")
	if err := n.dir.Set([]*Instance{
		n.instanceFor(idA, "web1", ga, "10.99.0.5"),
		n.instanceFor(idB, "web2", gb, "10.99.0.6"),
		impostor,
	}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		g    *netnstest.Guest
		code int
		body string
	}{
		{ga, 200, idA},
		{gb, 200, idB},
		{gc, 404, ""}, // an address that maps to no VM
		{gd, 404, ""}, // the right address from the wrong MAC
	} {
		code, body, err := nsDo(t, nsClient(tc.g), ctx, "GET", "/latest/meta-data/instance-id", nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.g.Name, err)
		}
		if code != tc.code || (tc.body != "" && body != tc.body) {
			t.Errorf("%s: %d %q, want %d %q", tc.g.Name, code, body, tc.code, tc.body)
		}
	}
	code, body, err := nsDo(t, nsClient(gb), ctx, "GET", "/openstack/latest/meta_data.json", nil)
	if err != nil || code != 200 || !strings.Contains(body, idB) || strings.Contains(body, idA) {
		t.Errorf("B's meta_data.json: %d %q %v", code, body, err)
	}

	// Interfaces come and go with their bridges.
	if err := n.srv.RemoveInterface(n.bridge); err != nil {
		t.Fatal(err)
	}
	// Refused (RST) or, where host filters drop it, unanswered.
	gone, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, _, err := nsDo(t, nsClient(ga), gone, "GET", "/latest/meta-data/instance-id", nil); err == nil {
		t.Error("still answering after RemoveInterface")
	}
	if err := n.srv.AddInterface(n.bridge); err != nil {
		t.Fatal(err)
	}
	if code, body, err := nsDo(t, nsClient(ga), ctx, "GET", "/latest/meta-data/instance-id", nil); err != nil || body != idA {
		t.Errorf("after AddInterface again: %d %q %v", code, body, err)
	}

	// A bridge deleted and created again under the same name has a new
	// ifindex: SyncInterfaces must replace the listener bound to the old one.
	old, err := netlink.LinkByName(n.bridge)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkDel(old); err != nil {
		t.Fatal(err)
	}
	// Same MAC as before, as the network code derives it: the guest's
	// neighbour entry for its gateway stays right.
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: n.bridge, HardwareAddr: old.Attrs().HardwareAddr}}); err != nil {
		t.Fatal(err)
	}
	configureBridge(t, n.bridge)
	if err := ga.AttachToBridge(n.bridge); err != nil {
		t.Fatal(err)
	}
	if err := n.srv.SyncInterfaces([]string{n.bridge}); err != nil {
		t.Fatal(err)
	}
	if code, body, err := nsDo(t, nsClient(ga), ctx, "GET", "/latest/meta-data/instance-id", nil); err != nil || body != idA {
		t.Errorf("after the bridge was re-created: %d %q %v", code, body, err)
	}
	if got := n.srv.Interfaces(); len(got) != 1 || got[0] != n.bridge {
		t.Errorf("interfaces = %v", got)
	}
}

// TestRealNetworkTokenTTL: the IMDSv2 token answer reaches the guest with IP
// TTL 1, and a namespace NATed behind the guest cannot get a token although
// it can read IMDSv1 paths.
func TestRealNetworkTokenTTL(t *testing.T) {
	n := newRealNet(t)
	ga := n.guest(t, "a", "10.99.0.5")
	if err := n.dir.Set([]*Instance{n.instanceFor(idA, "web1", ga, "10.99.0.5")}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sn, err := ga.Sniff()
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	code, tok, err := nsDo(t, nsClient(ga), ctx, "PUT", "/latest/api/token", map[string]string{tokenTTLHeader: "60"})
	if err != nil || code != 200 || tok == "" {
		t.Fatalf("token: %d %q %v", code, tok, err)
	}
	code, body, err := nsDo(t, nsClient(ga), ctx, "GET", "/latest/meta-data/instance-id", map[string]string{tokenHeader: tok})
	if err != nil || code != 200 || body != idA {
		t.Fatalf("with token: %d %q %v", code, body, err)
	}
	// Read what arrived: the token answer with TTL 1, the next answer with
	// the default TTL (the TTL is per connection, not per server).
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var tokenTTL, otherTTL int
	_, err = sn.Until(cctx, func(f []byte) bool {
		ttl, payload, ok := tcpFromMetadata(f)
		if !ok {
			return false
		}
		if strings.Contains(payload, tok) {
			tokenTTL = ttl
		}
		if strings.Contains(payload, idA) && !strings.Contains(payload, tok) {
			otherTTL = ttl
		}
		return tokenTTL != 0 && otherTTL != 0
	})
	if err != nil {
		t.Fatalf("capture: %v", err)
	}
	if tokenTTL != 1 || otherTTL <= 1 {
		t.Errorf("token answer TTL %d (want 1), other answer TTL %d (want > 1)", tokenTTL, otherTTL)
	}

	// A namespace routed and NATed behind guest A.
	behind := netnstest.NewNS(t, "mcmdbh"+n.bridge[4:])
	linkNamespaces(t, ga, "eth1", "10.98.0.1/24", behind, "eth0", "10.98.0.2/24", "10.98.0.1")
	if out, err := ga.Command(ctx, "sysctl", "-qw", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
		t.Fatalf("enable forwarding in the guest: %v: %s", err, out)
	}
	nft := ga.Command(ctx, "nft", "-f", "-")
	nft.Stdin = strings.NewReader("table ip mdnat {\n chain post {\n  type nat hook postrouting priority 100; policy accept;\n  oifname \"eth0\" masquerade\n }\n}\n")
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("masquerade in the guest: %v: %s", err, out)
	}
	bc := nsClient(behind)
	// IMDSv1 answers come back through the NAT (as on EC2)...
	if code, body, err := nsDo(t, bc, ctx, "GET", "/latest/meta-data/instance-id", nil); err != nil || code != 200 || body != idA {
		t.Fatalf("IMDSv1 from behind the guest: %d %q %v", code, body, err)
	}
	// ...but the token answer dies at the guest's forwarding hop.
	tctx, cancel2 := context.WithTimeout(ctx, 3*time.Second)
	defer cancel2()
	if code, tok, err := nsDo(t, bc, tctx, "PUT", "/latest/api/token", map[string]string{tokenTTLHeader: "60"}); err == nil {
		t.Fatalf("a host behind the guest got a token: %d %q", code, tok)
	}
}

// tcpFromMetadata parses an Ethernet frame carrying IPv4/TCP from
// 169.254.169.254:80 and returns its TTL and TCP payload.
func tcpFromMetadata(f []byte) (int, string, bool) {
	if len(f) < 14+20 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
		return 0, "", false
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != 6 || len(ip) < ihl+20 {
		return 0, "", false
	}
	src, _ := netip.AddrFromSlice(ip[12:16])
	tcp := ip[ihl:]
	if src != metadataIP || binary.BigEndian.Uint16(tcp[0:2]) != 80 {
		return 0, "", false
	}
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if total > len(ip) {
		total = len(ip)
	}
	off := int(tcp[12]>>4) * 4
	if ihl+off > total {
		return 0, "", false
	}
	return int(ip[8]), string(ip[ihl+off : total]), true
}

// linkNamespaces joins two namespaces with a veth pair and addresses it; the
// second side gets a default route via gw.
func linkNamespaces(t *testing.T, a interface{ Do(func() error) error }, aIf, aAddr string, b *netnstest.NS, bIf, bAddr, gw string) {
	t.Helper()
	tmpA, tmpB := "mdva"+fmt.Sprint(time.Now().UnixNano()%1e6), "mdvb"+fmt.Sprint(time.Now().UnixNano()%1e6)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: tmpA}, PeerName: tmpB}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	move := func(ns interface{ Do(func() error) error }, tmp, name, addr, gw string) {
		var fd netns.NsHandle
		if err := ns.Do(func() (err error) { fd, err = netns.Get(); return err }); err != nil {
			t.Fatal(err)
		}
		defer fd.Close()
		l, err := netlink.LinkByName(tmp)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetNsFd(l, int(fd)); err != nil {
			t.Fatalf("move %s: %v", tmp, err)
		}
		err = ns.Do(func() error {
			l, err := netlink.LinkByName(tmp)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetName(l, name); err != nil {
				return err
			}
			a, err := netlink.ParseAddr(addr)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(l, a); err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
			if lo, err := netlink.LinkByName("lo"); err == nil {
				_ = netlink.LinkSetUp(lo)
			}
			if gw != "" {
				return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP(gw)})
			}
			return nil
		})
		if err != nil {
			t.Fatalf("configure %s: %v", name, err)
		}
	}
	move(a, tmpA, aIf, aAddr, "")
	move(b, tmpB, bIf, bAddr, gw)
}
