// Package netnstest makes network-namespace "guests" for tests: a named
// netns whose eth0 is one end of a veth pair, the other end left on the host
// to be adopted as a minicloud port (network.PortSpec{Existing: true}) or
// attached straight to a bridge. It can run Go code or commands inside the
// namespace, obtain an address by DHCP, and send and capture raw frames, so
// tests can play a hostile guest. Everything it creates is removed by
// t.Cleanup. Tests using it need root; Require skips them otherwise.
package netnstest

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// GuestIf is the interface name inside every guest namespace.
const GuestIf = "eth0"

// Require skips the test unless it runs as root (namespaces, links and
// nftables need CAP_NET_ADMIN).
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, links and nftables rules")
	}
}

// NS is a named network namespace.
type NS struct {
	// Name is the netns name (under /var/run/netns).
	Name string
	// ns is never written after NewNS: a Do still running on another
	// goroutine (a dial a test gave up on) reads it while Close runs.
	ns        netns.NsHandle
	closeOnce sync.Once
}

// NewNS creates netns name, deleted by t.Cleanup.
func NewNS(t testing.TB, name string) *NS {
	t.Helper()
	h, err := newNamedNS(name)
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	n := &NS{Name: name, ns: h}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return n
}

// Close deletes the namespace; it is idempotent. It does what iproute2's
// `ip netns delete` does: a detaching unmount, then the unlink, retried
// while another mount namespace still holds a copy of the bind mount
// (QEMU processes started by libvirt live in mount namespaces of their
// own; /run/netns is a shared mount, see sharedRunNetns, so the unmount
// reaches their copies, but not always at once).
func (n *NS) Close() error {
	n.closeOnce.Do(func() {
		h := n.ns // NsHandle.Close writes the handle it is called on
		h.Close()
	})
	path := filepath.Join(runNetns, n.Name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete netns %s: unmount: %w", n.Name, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := os.Remove(path)
		switch {
		case err == nil || errors.Is(err, fs.ErrNotExist):
			return nil
		case errors.Is(err, unix.EBUSY) && time.Now().Before(deadline):
			time.Sleep(100 * time.Millisecond)
		default:
			return fmt.Errorf("delete netns %s: %w", n.Name, err)
		}
	}
}

// runNetns is where named network namespaces are bind-mounted.
const runNetns = "/run/netns"

// sharedRunNetns makes /run/netns a shared mount, as `ip netns add` does,
// so that a namespace's bind mount and its unmount propagate to mount
// namespaces made later (QEMU's), which would otherwise pin a private
// copy and make the unlink fail with EBUSY.
func sharedRunNetns() error {
	if err := os.MkdirAll(runNetns, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("", runNetns, "none", unix.MS_SHARED|unix.MS_REC, ""); err == nil {
		return nil
	} else if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("make %s shared: %w", runNetns, err)
	}
	// Not a mount point yet: bind it onto itself first.
	if err := unix.Mount(runNetns, runNetns, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", runNetns, err)
	}
	if err := unix.Mount("", runNetns, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", runNetns, err)
	}
	return nil
}

// Guest is a network namespace with one veth-backed NIC.
type Guest struct {
	*NS
	// HostIf is the veth end left in the host namespace.
	HostIf string
	// host is the namespace playing the host; nil for the real one.
	host *NS
	// MAC is the address of the guest's eth0.
	MAC net.HardwareAddr
}

// NewGuest creates netns "mct-<hostIf>" with eth0 (MAC mac, or a random
// locally administered one when nil) and leaves hostIf, down and unattached,
// in the host namespace.
func NewGuest(t testing.TB, hostIf string, mac net.HardwareAddr) *Guest {
	t.Helper()
	if mac == nil {
		mac = RandomMAC()
	}
	g := &Guest{NS: NewNS(t, "mct-"+hostIf), HostIf: hostIf, MAC: mac}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("clean up guest %s: %v", g.Name, err)
		}
	})
	// The peer is created under a temporary name in the host namespace (eth0
	// exists there) and renamed once inside the guest.
	tmp := hostIf + "g"
	if len(tmp) > 15 {
		tmp = tmp[len(tmp)-15:]
	}
	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: hostIf},
		PeerName:         tmp,
		PeerHardwareAddr: mac,
		PeerNamespace:    netlink.NsFd(int(g.ns)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("create veth %s: %v", hostIf, err)
	}
	err := g.Do(func() error {
		l, err := netlink.LinkByName(tmp)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetName(l, GuestIf); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		t.Fatalf("set up %s in %s: %v", GuestIf, g.Name, err)
	}
	return g
}

// NewGuestIn is NewGuest with hostIf placed in the namespace host, which
// plays the hypervisor host (tests that must not touch the real host's
// ruleset).
func NewGuestIn(t testing.TB, host *NS, hostIf string, mac net.HardwareAddr) *Guest {
	t.Helper()
	g := NewGuest(t, hostIf, mac)
	l, err := netlink.LinkByName(hostIf)
	if err != nil {
		t.Fatalf("look up %s: %v", hostIf, err)
	}
	if err := netlink.LinkSetNsFd(l, int(host.ns)); err != nil {
		t.Fatalf("move %s into %s: %v", hostIf, host.Name, err)
	}
	g.host = host
	return g
}

// AttachToBridge puts the host end straight on a bridge, unfiltered (for
// tests of things other than the port filter).
func (g *Guest) AttachToBridge(bridge string) error {
	l, err := netlink.LinkByName(g.HostIf)
	if err != nil {
		return fmt.Errorf("look up %s: %w", g.HostIf, err)
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("look up bridge %s: %w", bridge, err)
	}
	if err := netlink.LinkSetMaster(l, br); err != nil {
		return fmt.Errorf("attach %s to %s: %w", g.HostIf, bridge, err)
	}
	return netlink.LinkSetUp(l)
}

// Do runs fn on an OS thread switched into the namespace. Sockets fn opens
// stay in the namespace after it returns. fn must not call t.FailNow.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	// A fresh goroutine whose thread is never handed back to the scheduler
	// unless its namespace was restored: otherwise the runtime throws the
	// thread away instead of reusing it for unrelated code.
	go func() {
		err := errors.New("function exited early (runtime.Goexit)")
		defer func() { errc <- err }()
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			err = fmt.Errorf("get current netns: %w", gerr)
			return
		}
		defer orig.Close()
		defer func() {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
		}()
		if serr := netns.Set(n.ns); serr != nil {
			err = fmt.Errorf("enter netns %s: %w", n.Name, serr)
			return
		}
		err = fn()
	}()
	return <-errc
}

// Command returns a command that runs inside the namespace.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	// ip netns exec also gives the command the namespace's /etc/netns view.
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Addr returns the guest's IPv4 address on eth0 (zero when none).
func (g *Guest) Addr() (netip.Prefix, error) {
	var out netip.Prefix
	err := g.Do(func() error {
		l, err := netlink.LinkByName(GuestIf)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			ip, _ := netip.AddrFromSlice(a.IP.To4())
			ones, _ := a.Mask.Size()
			out = netip.PrefixFrom(ip, ones)
			return nil
		}
		return nil
	})
	return out, err
}

// SetAddr configures eth0 statically, with a default route via gw when valid.
func (g *Guest) SetAddr(p netip.Prefix, gw netip.Addr) error {
	return g.Do(func() error {
		l, err := netlink.LinkByName(GuestIf)
		if err != nil {
			return err
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}
		if err := netlink.AddrReplace(l, addr); err != nil {
			return fmt.Errorf("add %s: %w", p, err)
		}
		if gw.IsValid() {
			r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice()}
			if err := netlink.RouteReplace(r); err != nil {
				return fmt.Errorf("default route via %s: %w", gw, err)
			}
		}
		return nil
	})
}

// DHCP runs a DHCPv4 exchange on eth0 (insomniacslk/dhcp nclient4, inside the
// namespace) and, when it succeeds, configures the leased address and the
// default route. opts tune the client (e.g. nclient4.WithTimeout).
func (g *Guest) DHCP(ctx context.Context, opts ...nclient4.ClientOpt) (*nclient4.Lease, error) {
	var c *nclient4.Client
	if err := g.Do(func() (err error) {
		c, err = nclient4.New(GuestIf, opts...)
		return err
	}); err != nil {
		return nil, fmt.Errorf("dhcp client in %s: %w", g.Name, err)
	}
	defer c.Close()
	lease, err := c.Request(ctx)
	if err != nil {
		return nil, fmt.Errorf("dhcp in %s: %w", g.Name, err)
	}
	ack := lease.ACK
	ip, _ := netip.AddrFromSlice(ack.YourIPAddr.To4())
	ones, _ := ack.SubnetMask().Size()
	var gw netip.Addr
	if rs := ack.Router(); len(rs) > 0 {
		gw, _ = netip.AddrFromSlice(rs[0].To4())
	}
	if err := g.SetAddr(netip.PrefixFrom(ip, ones), gw); err != nil {
		return nil, fmt.Errorf("configure lease in %s: %w", g.Name, err)
	}
	return lease, nil
}

// Close deletes the veth pair and the namespace; it is idempotent.
func (g *Guest) Close() error {
	if l, err := netlink.LinkByName(g.HostIf); g.host == nil && err == nil && l.Type() == "veth" {
		if err := netlink.LinkDel(l); err != nil {
			return fmt.Errorf("delete %s: %w", g.HostIf, err)
		}
	}
	return g.NS.Close()
}

// RandomMAC returns a random unicast, locally administered MAC.
func RandomMAC() net.HardwareAddr {
	m := make(net.HardwareAddr, 6)
	_, _ = rand.Read(m)
	m[0] = m[0]&0xfc | 0x02
	return m
}

// newNamedNS creates a named namespace without leaving the caller's thread in it.
func newNamedNS(name string) (netns.NsHandle, error) {
	if err := sharedRunNetns(); err != nil {
		return netns.None(), err
	}
	type result struct {
		ns  netns.NsHandle
		err error
	}
	rc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			rc <- result{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if rerr := netns.Set(orig); rerr == nil {
			runtime.UnlockOSThread()
		}
		rc <- result{ns, err}
	}()
	r := <-rc
	return r.ns, r.err
}

// WaitUp blocks until both ends of the guest's veth are operationally up.
// Until the kernel's link watcher has activated a device, frames sent on it
// are dropped, so a test that sends right away would lose its first packets.
func (g *Guest) WaitUp(ctx context.Context) error {
	var host *netns.NsHandle
	if g.host != nil {
		host = &g.host.ns
	}
	if err := waitOperUp(ctx, host, g.HostIf); err != nil {
		return err
	}
	return waitOperUp(ctx, &g.ns, GuestIf)
}

func waitOperUp(ctx context.Context, ns *netns.NsHandle, name string) error {
	updates := make(chan netlink.LinkUpdate, 16)
	done := make(chan struct{})
	defer close(done)
	opts := netlink.LinkSubscribeOptions{ListExisting: true, Namespace: ns}
	if err := netlink.LinkSubscribeWithOptions(updates, done, opts); err != nil {
		return fmt.Errorf("subscribe to links: %w", err)
	}
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never came up: %w", name, ctx.Err())
		case u, ok := <-updates:
			if !ok {
				return fmt.Errorf("link subscription for %s ended", name)
			}
			if u.Link.Attrs().Name == name && u.Link.Attrs().OperState == netlink.OperUp {
				return nil
			}
		}
	}
}

// Handle is the namespace's handle, e.g. for netlink subscriptions in it.
func (n *NS) Handle() netns.NsHandle { return n.ns }
