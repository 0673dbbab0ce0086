package agent_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/minicloud/minicloud/agent/network/linux"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

// TestPortForwardOnRealLibvirt: a tiny guest serving TCP (mc-guestprobe's
// mc-listen: every connection gets "MINICLOUD-HELLO <hostname>") is reached
// from another network namespace, which knows nothing but a link to this
// host, through the host's address on that link and the exposed port. A
// second VM cannot take the port; unexpose closes it; expose again and
// deleting the VM removes the rule from the kernel.
func TestPortForwardOnRealLibvirt(t *testing.T) {
	c := newTinyCloud(t)
	netnstest.Require(t)
	const guestPort = "8080"
	c.MustMC("vm", "create", "web1", "--image", "tiny", "--flavor", "tiny", "--metadata", "mc-listen="+guestPort)
	// web2 only tries to take web1's port; it boots meanwhile.
	c.MustMC("vm", "create", "web2", "--image", "tiny", "--flavor", "tiny")
	vm := waitVM(t, c, "web1", "running", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	id := vm.GetMeta().GetId()
	consoleShows(t, c, "web1", "MINICLOUD-LISTEN port="+guestPort+" ok=true")

	// The client: a namespace on a /30 link to this host. A random host
	// port and link, so a `make up` cloud or another test beside this one
	// is not in the way.
	b := rand.IntN(60)
	hostAddr := netip.MustParsePrefix(fmt.Sprintf("172.31.%d.%d/30", 200+b/60, 4*(b%60)+1))
	clientAddr := netip.PrefixFrom(hostAddr.Addr().Next(), 30)
	client := netnstest.NewGuest(t, fmt.Sprintf("mcx-%s", id[:8]), nil)
	l, err := netlink.LinkByName(client.HostIf)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: hostAddr.Addr().AsSlice(), Mask: net.CIDRMask(30, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	if err := client.SetAddr(clientAddr, netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	hostPort := 20000 + rand.IntN(12000)
	target := net.JoinHostPort(hostAddr.Addr().String(), strconv.Itoa(hostPort))
	// dial returns the first line the service sends, or the error.
	dial := func() (string, error) {
		var line string
		err := client.Do(func() error {
			conn, err := net.DialTimeout("tcp4", target, 2*time.Second)
			if err != nil {
				return err
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
			line, err = bufio.NewReader(conn).ReadString('\n')
			return err
		})
		return strings.TrimSpace(line), err
	}
	// until polls dial (the agent programs the forward after the API
	// stored it) until ok says the answer is the one expected.
	until := func(what string, ok func(string, error) bool) {
		t.Helper()
		var line string
		var err error
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if line, err = dial(); ok(line, err) {
				return
			}
		}
		t.Fatalf("%s: last answer from %s: %q, %v\nlog:\n%s", what, target, line, err, c.Log())
	}
	served := func(line string, err error) bool {
		return err == nil && strings.HasPrefix(line, "MINICLOUD-HELLO web1")
	}
	refused := func(_ string, err error) bool { return err != nil && strings.Contains(err.Error(), "refused") }

	start := time.Now()
	out := c.MustMC("vm", "expose", "web1", "--port", fmt.Sprintf("%d:%s", hostPort, guestPort))
	if !strings.Contains(out, fmt.Sprintf("%d/tcp ->", hostPort)) {
		t.Errorf("vm expose printed %q", out)
	}
	until("the guest's service through the forward", served)
	t.Logf("forward usable %s after vm expose returned", time.Since(start).Round(time.Millisecond))
	if show := c.MustMC("vm", "show", "web1"); !strings.Contains(show, fmt.Sprintf("%d/tcp -> %s:%s", hostPort, vm.GetStatus().GetAddresses()[0].GetIp(), guestPort)) {
		t.Errorf("vm show does not list the forward:\n%s", show)
	}

	// The port is taken for every other VM.
	_, stderr, code := c.MC("vm", "expose", "web2", "--port", fmt.Sprintf("%d:80", hostPort))
	if code == 0 || !strings.Contains(stderr, "already forwarded to vm web1") {
		t.Errorf("expose of a taken port: exit %d, %s", code, stderr)
	}
	c.MustMC("vm", "delete", "web2")

	c.MustMC("vm", "unexpose", "web1", "--port", strconv.Itoa(hostPort))
	until("the port closed after unexpose", refused)

	// Expose again, then delete the VM: the rule goes with it.
	c.MustMC("vm", "expose", "web1", "--port", fmt.Sprintf("%d:%s/tcp", hostPort, guestPort))
	until("the guest's service through the forward again", served)
	c.MustMC("vm", "delete", "web1", "--wait")
	fwds, err := linux.New().ListPortForwards(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fwds {
		if f.VMID == id {
			t.Errorf("forward of deleted VM %s left in the kernel: %+v", id, f)
		}
	}
	until("the port closed after the VM was deleted", refused)
	waitVM(t, c, "web2", "deleted", nil)
	assertNothingLeft(t, c, id)
}
