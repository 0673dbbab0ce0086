package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/netnstest"
)

func testVM() *minicloudv1.VM {
	return &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: "7d0b3c53-5d2e-4c8e-9a57-0a4c1f3e9b11", Name: "web1", CreateTime: timestamppb.Now()},
		Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small",
			SshPublicKeys: []string{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKn0u8Jtq4m7bPjgq1JYtP3E4cS3G2m6Vv3J8D4w0C1Q alice"}},
		Status: &minicloudv1.VMStatus{Addresses: []*minicloudv1.VMAddress{{
			Network: "default", Bridge: "mc-1234abcd", Ip: "10.0.0.5", PrefixLength: 24, Gateway: "10.0.0.1", Mac: "fa:16:3e:00:00:05"}}},
	}
}

// TestSnapshotHasWhatCloudInitAsks: the static tree holds every path
// cloud-init 22.4's OpenStack datasource asks, with the metadata service's
// answers for this VM.
func TestSnapshotHasWhatCloudInitAsks(t *testing.T) {
	files, err := snapshot(testVM(), []byte("#cloud-config\n"))
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/openstack":                                  "latest",
		"/openstack/latest/meta_data.json":            `"uuid":"7d0b3c53-5d2e-4c8e-9a57-0a4c1f3e9b11"`,
		"/openstack/2018-08-27/network_data.json":     `"type":"ipv4_dhcp"`,
		"/openstack/latest/user_data":                 "#cloud-config",
		"/openstack/latest/vendor_data.json":          "",
		"/openstack/latest/vendor_data2.json":         "",
		"/latest/meta-data/":                          "instance-id",
		"/latest/meta-data":                           "instance-id",
		"/latest/meta-data/instance-id":               "7d0b3c53-5d2e-4c8e-9a57-0a4c1f3e9b11",
		"/2009-04-04/meta-data/public-keys/0/":        "openssh-key",
		"/latest/meta-data/public-keys/0/openssh-key": "ssh-ed25519",
		"/latest/user-data":                           "#cloud-config",
	} {
		body, ok := files[path]
		if !ok {
			t.Errorf("snapshot lacks %s", path)
			continue
		}
		if !strings.Contains(strings.ReplaceAll(string(body), " ", ""), want) {
			t.Errorf("%s = %q, want it to contain %q", path, body, want)
		}
	}
}

// TestDivertToStatic: a namespace guest on a bridge that holds
// 169.254.169.254 (as minicloud's bridges do) connects to
// 169.254.169.254:80 and is answered by the static server in its own
// namespace through the DNAT rule.
func TestDivertToStatic(t *testing.T) {
	netnstest.Require(t)
	n := rand.IntN(200)
	bridge := fmt.Sprintf("mcbbt%d", n)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridge}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatalf("add bridge: %v", err)
	}
	t.Cleanup(func() { _ = netlink.LinkDel(br) })
	gw := netip.MustParseAddr(fmt.Sprintf("10.251.%d.1", n))
	for _, a := range []string{gw.String() + "/24", "169.254.169.254/32"} {
		addr, _ := netlink.ParseAddr(a)
		if err := netlink.AddrAdd(br, addr); err != nil {
			t.Fatalf("add %s: %v", a, err)
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	guest := netnstest.NewGuest(t, fmt.Sprintf("mcbbv%d", n), nil)
	if err := guest.AttachToBridge(bridge); err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr(fmt.Sprintf("10.251.%d.2", n))
	if err := guest.SetAddr(netip.PrefixFrom(ip, 24), gw); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := guest.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}

	static, err := startStatic(map[string][]byte{"/openstack": []byte("2018-08-27\nlatest")})
	if err != nil {
		t.Fatal(err)
	}
	defer static.close()
	undo, err := divert(ip, static.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer undo()

	get := func(path string) (int, string, error) {
		var code int
		var body []byte
		err := guest.Do(func() error {
			c, err := net.DialTimeout("tcp", "169.254.169.254:80", 10*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", path)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			code = resp.StatusCode
			body, err = io.ReadAll(resp.Body)
			return err
		})
		return code, string(body), err
	}
	if code, body, err := get("/openstack"); err != nil || code != 200 || body != "2018-08-27\nlatest" {
		out, _ := exec.Command("nft", "list", "table", "ip", fmt.Sprintf("mc_bootbench_%d", os.Getpid())).CombinedOutput()
		t.Fatalf("GET /openstack from the guest: %d %q %v\n%s", code, body, err, out)
	}
	if code, _, err := get("/openstack/latest/nothing"); err != nil || code != 404 {
		t.Fatalf("GET of a path not in the tree: %d %v", code, err)
	}
	_, requests, missing := static.stats()
	if requests != 2 || len(missing) != 1 || missing[0] != "GET /openstack/latest/nothing" {
		t.Fatalf("static server saw %d requests, missing %v", requests, missing)
	}
}
