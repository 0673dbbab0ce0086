package e2e

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/metadata"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// TestLabTenantNetworkAcrossHosts (issue 10, section 3): network A spans
// host1 (a1) and host2 (a2) over VXLAN, network B has b1 on host2. The tiny
// guests run the checks their metadata asks for (cmd/mc-guestprobe: mc-ping,
// mc-tcp, mc-listen) and print the results on their consoles:
//   - a1 and a2 reach each other by IP, by name and by FQDN (ping, TCP);
//   - a 1422-byte ping with Don't Fragment passes (1450 on the wire, the
//     MTU every lease carries), 1423 bytes do not fit the guest's MTU;
//   - b1 reaches its host's metadata service but never a1 or a2 (ping or
//     TCP);
//   - VXLAN frames for network A injected on the underlay from a non-VTEP
//     address, or from a VTEP claiming the gateway, never reach a2, while
//     the same frame from host1's VTEP with a1's true source does.
func TestLabTenantNetworkAcrossHosts(t *testing.T) {
	l := Shared(t)
	ctx := context.Background()
	c, err := l.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hosts := l.HostNames()
	h1, h2 := hosts[0], hosts[1]

	nets := map[string]string{"lt-a": "10.61.0.0/24", "lt-b": "10.62.0.0/24"}
	for name, cidr := range nets {
		if _, err := c.Networks.CreateNetwork(ctx, &minicloudv1.CreateNetworkRequest{Name: name, Cidr: cidr}); err != nil && !errdefs.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	var created []string
	defer func() {
		deleteVMs(t, l, c, created)
		for name := range nets {
			if _, err := c.Networks.DeleteNetwork(ctx, &minicloudv1.DeleteNetworkRequest{Name: name}); err != nil {
				t.Errorf("delete network %s: %v", name, err)
			}
		}
	}()
	// The API allocates a VM's address in CreateVM, so each guest's checks
	// can name the guests created before it without waiting for them to
	// run: the three boot at once, and a check that runs before its
	// target is up fails that round only (every round repeats them all).
	create := func(name, network, host string, md map[string]string) *minicloudv1.VMAddress {
		t.Helper()
		md["mc-rounds"] = "40"
		vm, err := c.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{Name: name, RequestId: "lt-" + name,
			Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny", TargetHost: host, Networks: []string{network}, Metadata: md}})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		created = append(created, name)
		vmIDs = append(vmIDs, vm.GetMeta().GetId())
		if a := vm.GetStatus().GetAddresses(); len(a) == 1 && a[0].GetIp() != "" {
			return a[0]
		}
		t.Fatalf("%s has addresses %v after create", name, vm.GetStatus().GetAddresses())
		return nil
	}
	const port = "7777"
	fqdn := "a2." + metadata.DefaultDomain
	a2 := create("a2", "lt-a", h2, map[string]string{"mc-listen": port, "mc-ping": "a1", "mc-tcp": "a1:" + port})
	a1 := create("a1", "lt-a", h1, map[string]string{"mc-listen": port,
		"mc-ping": strings.Join([]string{a2.GetIp(), "a2", fqdn, a2.GetIp() + "/1422", a2.GetIp() + "/1423"}, ","),
		"mc-tcp":  a2.GetIp() + ":" + port})
	// b1's control: its host's metadata service (the gateway answers no
	// ping), so a b1 whose network is down does not pass for isolated.
	create("b1", "lt-b", h2, map[string]string{
		"mc-ping": a1.GetIp() + "," + a2.GetIp(),
		"mc-tcp":  strings.Join([]string{metadataTCP, a1.GetIp() + ":" + port, a2.GetIp() + ":" + port}, ",")})
	for _, name := range created {
		if _, err := l.WaitVM(ctx, name, minicloudv1.VMPhase_VM_PHASE_RUNNING, 5*time.Minute); err != nil {
			t.Fatal(err)
		}
	}

	// Every check that must pass passes in some round.
	want := map[string][]string{
		"a1": {"ping " + a2.GetIp(), "ping a2", "ping " + fqdn, "ping " + a2.GetIp() + "/1422", "tcp " + a2.GetIp() + ":" + port},
		"a2": {"ping a1", "tcp a1:" + port},
	}
	deadline := time.Now().Add(6 * time.Minute) // TCG boots on a shared machine
	for vm, checks := range want {
		for {
			rs := consoleChecks(t, c, vm)
			missing := []string{}
			for _, chk := range checks {
				if !rs.passed(chk) {
					missing = append(missing, chk)
				}
			}
			if len(missing) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never passed %v; its console:\n%s", vm, missing, rs.raw)
			}
			time.Sleep(3 * time.Second)
		}
	}
	rs := consoleChecks(t, c, "a1")
	if !strings.Contains(rs.detail("tcp "+a2.GetIp()+":"+port), "MINICLOUD-HELLO a2") {
		t.Errorf("a1's TCP to a2 was answered by %q, not a2", rs.detail("tcp "+a2.GetIp()+":"+port))
	}
	big := "ping " + a2.GetIp() + "/1423"
	if rs.passed(big) || !strings.Contains(rs.detail(big), "message too long") {
		t.Errorf("a 1423-byte DF ping does not fail on the guest's MTU: %q (passed %t)", rs.detail(big), rs.passed(big))
	}
	// b1 was created last and may still be booting when a1 and a2 pass:
	// its lease line is waited for (a lease without MTU 1450 stays one).
	leaseMTU := regexp.MustCompile(`MINICLOUD-DHCP bound ip=\S+ router=\S+ mtu=1450\b`)
	for _, vm := range []string{"a1", "a2", "b1"} {
		for {
			out := consoleChecks(t, c, vm).raw
			if leaseMTU.MatchString(out) {
				break
			}
			if strings.Contains(out, "MINICLOUD-DHCP bound") || time.Now().After(deadline) {
				t.Errorf("%s's DHCP lease has no MTU 1450:\n%s", vm, grepLines(out, "MINICLOUD-DHCP"))
				break
			}
			time.Sleep(3 * time.Second)
		}
	}

	// b1 runs while a1 and a2 answer: two more of its rounds after this
	// point, with its metadata service answering, and no round reached A.
	start := consoleChecks(t, c, "b1").rounds
	for {
		rs := consoleChecks(t, c, "b1")
		if rs.rounds >= start+2 && rs.passed("tcp "+metadataTCP) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("b1 ran no two rounds reaching its metadata service; its console:\n%s", rs.raw)
		}
		time.Sleep(3 * time.Second)
	}
	rs = consoleChecks(t, c, "b1")
	for _, chk := range []string{"ping " + a1.GetIp(), "ping " + a2.GetIp(), "tcp " + a1.GetIp() + ":" + port, "tcp " + a2.GetIp() + ":" + port} {
		if rs.passed(chk) || rs.count(chk) == 0 {
			t.Errorf("b1 on network B: %s passed=%t (%d tries): %q", chk, rs.passed(chk), rs.count(chk), rs.detail(chk))
		}
	}

	injectForgedVXLAN(t, l, c, h1, h2, a1, a2)
}

const metadataTCP = "169.254.169.254:80"

// checkResults are the MINICLOUD-CHECK lines of one guest's console.
type checkResults struct {
	raw    string
	rounds int
	ok     map[string]bool
	tries  map[string]int
	last   map[string]string
}

var checkLine = regexp.MustCompile(`MINICLOUD-CHECK round=(\d+) kind=(\w+) target=(\S+) ok=(\w+) detail=("(?:[^"\\]|\\.)*")`)
var roundLine = regexp.MustCompile(`MINICLOUD-ROUND round=(\d+) done`)

func consoleChecks(t *testing.T, c *client.Client, vm string) checkResults {
	t.Helper()
	resp, err := c.VMs.GetConsoleLog(context.Background(), &minicloudv1.GetConsoleLogRequest{Name: vm, TailBytes: 1 << 20})
	if err != nil {
		t.Fatalf("console log of %s: %v", vm, err)
	}
	rs := checkResults{raw: string(resp.Data), ok: map[string]bool{}, tries: map[string]int{}, last: map[string]string{}}
	for _, m := range checkLine.FindAllStringSubmatch(rs.raw, -1) {
		key := m[2] + " " + m[3]
		rs.tries[key]++
		rs.ok[key] = rs.ok[key] || m[4] == "true"
		if d, err := strconv.Unquote(m[5]); err == nil {
			rs.last[key] = d
		}
	}
	for _, m := range roundLine.FindAllStringSubmatch(rs.raw, -1) {
		if n, _ := strconv.Atoi(m[1]); n > rs.rounds {
			rs.rounds = n
		}
	}
	return rs
}

func (r checkResults) passed(check string) bool   { return r.ok[check] }
func (r checkResults) count(check string) int     { return r.tries[check] }
func (r checkResults) detail(check string) string { return r.last[check] }

func grepLines(s, substr string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, substr) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// injectForgedVXLAN sends VXLAN frames for network A to h2's VTEP, each
// carrying a UDP packet to a2 with its own destination port, and counts
// with an nftables counter in h2 (bridge forward, after minicloud's
// filters) which of them were forwarded towards a2:
//   - 9991: a1's MAC and IP, from the machine's underlay address (no VTEP);
//   - 9992: a1's MAC, the gateway's IP, from h1's VTEP;
//   - 9993: a1's MAC and IP from h1's VTEP, the one legitimate frame: it
//     must arrive, or the counter proves nothing.
func injectForgedVXLAN(t *testing.T, l *lab.Lab, c *client.Client, h1, h2 string, a1, a2 *minicloudv1.VMAddress) {
	t.Helper()
	ctx := context.Background()
	n, err := c.Networks.GetNetwork(ctx, &minicloudv1.GetNetworkRequest{Name: a1.GetNetwork()})
	if err != nil {
		t.Fatal(err)
	}
	if n.GetVni() == 0 {
		t.Fatalf("network %s has no VNI", a1.GetNetwork())
	}
	const table = "mcltcapture"
	nft := func(args ...string) string {
		t.Helper()
		out, err := l.Output(ctx, h2, append([]string{"nft"}, args...)...)
		if err != nil {
			t.Fatalf("nft %v on %s: %v\n%s", args, h2, err, out)
		}
		return out
	}
	nft("add", "table", "bridge", table)
	defer nft("delete", "table", "bridge", table)
	nft("add", "chain", "bridge", table, "capture", "{ type filter hook forward priority 100; policy accept; }")
	for _, p := range []string{"9991", "9992", "9993"} {
		nft("add", "rule", "bridge", table, "capture", "ether", "daddr", a2.GetMac(), "udp", "dport", p, "counter", "comment", `"`+p+`"`)
	}
	frame := func(srcIP string, dport uint16) []byte {
		return vxlanFrame(n.GetVni(), mustMAC(t, a2.GetMac()), mustMAC(t, a1.GetMac()),
			netip.MustParseAddr(srcIP), netip.MustParseAddr(a2.GetIp()), dport)
	}
	dst := &net.UDPAddr{IP: l.HostAddr(h2).AsSlice(), Port: 4789}
	for i := 0; i < 3; i++ {
		sendUDP(t, "", dst, frame(a1.GetIp(), 9991))
		sendUDP(t, l.Name+"-"+h1, dst, frame(a1.GetGateway(), 9992))
		sendUDP(t, l.Name+"-"+h1, dst, frame(a1.GetIp(), 9993))
	}
	time.Sleep(time.Second)
	out := nft("list", "table", "bridge", table)
	counts := map[string]int{}
	for _, m := range regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "(\d+)"`).FindAllStringSubmatch(out, -1) {
		counts[m[2]], _ = strconv.Atoi(m[1])
	}
	if counts["9993"] == 0 {
		t.Errorf("the legitimate frame from %s's VTEP never reached a2: the capture sees nothing\n%s", h1, out)
	}
	if counts["9991"] != 0 {
		t.Errorf("%d frames with a1's source from a non-VTEP underlay address reached a2", counts["9991"])
	}
	if counts["9992"] != 0 {
		t.Errorf("%d frames claiming the gateway %s from %s's VTEP reached a2", counts["9992"], a1.GetGateway(), h1)
	}
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// vxlanFrame builds VXLAN header + Ethernet + IPv4 + UDP (RFC 7348).
func vxlanFrame(vni uint32, dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, dport uint16) []byte {
	payload := []byte("minicloud-forged")
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...) // checksum 0: none
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	b := make([]byte, 8, 8+14+len(ip)+len(udp))
	b[0] = 0x08
	binary.BigEndian.PutUint32(b[4:], vni<<8)
	b = append(b, dstMAC...)
	b = append(b, srcMAC...)
	b = append(b, 0x08, 0x00)
	b = append(append(b, ip...), udp...)
	return b
}

// sendUDP sends b to dst from the network namespace nsName ("" = the
// machine's own: the underlay's router address, which is no VTEP).
func sendUDP(t *testing.T, nsName string, dst *net.UDPAddr, b []byte) {
	t.Helper()
	conn, err := func() (*net.UDPConn, error) {
		if nsName == "" {
			return net.DialUDP("udp4", nil, dst)
		}
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, err := netns.Get()
		if err != nil {
			return nil, err
		}
		defer orig.Close()
		ns, err := netns.GetFromName(nsName)
		if err != nil {
			return nil, err
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			return nil, err
		}
		defer netns.Set(orig)
		return net.DialUDP("udp4", nil, dst)
	}()
	if err != nil {
		t.Fatalf("UDP socket in %q: %v", nsName, err)
	}
	defer conn.Close()
	if _, err := conn.Write(b); err != nil {
		t.Fatalf("send VXLAN from %q: %v", nsName, err)
	}
}

// deleteVMs deletes the named VMs and waits until they are gone.
func deleteVMs(t *testing.T, l *lab.Lab, c *client.Client, names []string) {
	t.Helper()
	ctx := context.Background()
	for _, name := range names {
		if _, err := c.VMs.DeleteVM(ctx, &minicloudv1.DeleteVMRequest{Name: name}); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("delete %s: %v", name, err)
		}
	}
	deadline := time.Now().Add(5 * time.Minute)
	for _, name := range names {
		for {
			_, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: name})
			if errdefs.IsNotFound(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s not deleted after 5m (%v)", name, err)
				break
			}
			time.Sleep(time.Second)
		}
	}
}
