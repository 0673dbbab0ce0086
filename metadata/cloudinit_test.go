package metadata

import (
	"encoding/json"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/minicloud/minicloud/metadata/internal/cloudinittest"
)

// TestCloudInitReadsService: cloud-init 22.4's own Ec2 (IMDSv2) and
// OpenStack readers crawl the service and get this guest's data, and what
// its converters and renderers make of the network data of both trees is
// DHCP (checkRenderedDHCP).
func TestCloudInitReadsService(t *testing.T) {
	_, key, _ := newKeyPair(t)
	a := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	a.UserData = []byte("#cloud-config\nhostname: web1\n")
	dir := NewDirectory()
	if err := dir.Set([]*Instance{a}); err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(dir, Options{IdentityKey: key})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// cloud-init connects from 127.0.0.1: that is guest A.
	guests := loopbackGuests{netip.MustParseAddr("127.0.0.1"): {Interface: "mc-test", Addr: netip.MustParseAddr("10.0.0.5"), MAC: mustMAC("52:54:00:00:00:0a")}}
	go func() { _ = srv.ServeListener(l, guests) }()
	defer srv.Close()

	out, err := cloudinittest.Command(t, "service", "http://"+l.Addr().String()).Output()
	if err != nil {
		t.Fatalf("cloud-init client: %v: %s", err, cloudinittest.Stderr(err))
	}
	var got struct {
		EC2         map[string]any `json:"ec2"`
		EC2_2009    map[string]any `json:"ec2_2009"`
		UserData    string         `json:"ec2_userdata"`
		Identity    map[string]any `json:"ec2_identity"`
		OpenStack   map[string]any `json:"openstack"`
		NetworkConf map[string]any `json:"network_config"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("client output: %v: %s", err, out)
	}
	for name, md := range map[string]map[string]any{"2021-03-23": got.EC2, "2009-04-04": got.EC2_2009} {
		if md["instance-id"] != idA || md["local-ipv4"] != "10.0.0.5" || md["local-hostname"] != "web1.minicloud.internal" {
			t.Errorf("cloud-init's EC2 crawl (%s) = %v", name, md)
		}
		pk, _ := md["public-keys"].(map[string]any)
		if keys, _ := pk["alice"].([]any); len(keys) != 1 || !strings.HasPrefix(keys[0].(string), "ssh-ed25519 ") {
			t.Errorf("cloud-init's EC2 public-keys (%s) = %v", name, md["public-keys"])
		}
		macs, _ := md["network"].(map[string]any)["interfaces"].(map[string]any)["macs"].(map[string]any)
		if nic, _ := macs["52:54:00:00:00:0a"].(map[string]any); nic["local-ipv4s"] != "10.0.0.5" {
			t.Errorf("cloud-init's EC2 network (%s) = %v", name, md["network"])
		}
	}
	if got.UserData != string(a.UserData) {
		t.Errorf("cloud-init's EC2 user-data = %q", got.UserData)
	}
	if doc, _ := got.Identity["document"].(map[string]any); doc["instanceId"] != idA {
		t.Errorf("cloud-init's identity document = %v", got.Identity)
	}
	md, _ := got.OpenStack["metadata"].(map[string]any)
	if md["uuid"] != idA || md["hostname"] != "web1" || got.OpenStack["userdata"] != string(a.UserData) || got.OpenStack["version"] != float64(2) {
		t.Errorf("cloud-init's OpenStack read = %v", got.OpenStack)
	}
	if ec2md, _ := got.OpenStack["ec2-metadata"].(map[string]any); ec2md["instance-id"] != idA {
		t.Errorf("cloud-init's OpenStack ec2-metadata = %v", got.OpenStack["ec2-metadata"])
	}
	checkDHCPNetConfig(t, got.NetworkConf, "52:54:00:00:00:0a")
	nd := got.OpenStack["networkdata"]
	checkRenderedDHCP(t, "network_data.json", cloudinittest.Render(t, map[string]any{"network_data": nd}), 1450)
	// The Ec2 datasource's own conversion of the network/ section.
	checkRenderedDHCP(t, "EC2 network", cloudinittest.Render(t, map[string]any{
		"ec2_network": got.EC2["network"], "macs": map[string]string{"52:54:00:00:00:0a": "eth0"},
	}), 0)
}

// checkDHCPNetConfig checks cloud-init's network config v1 from our
// network_data.json: a physical NIC with a dhcp4 subnet, nothing static.
func checkDHCPNetConfig(t *testing.T, nc map[string]any, mac string) {
	t.Helper()
	cfg, _ := nc["config"].([]any)
	for _, c := range cfg {
		m, _ := c.(map[string]any)
		if m["type"] != "physical" || m["mac_address"] != mac {
			continue
		}
		subnets, _ := m["subnets"].([]any)
		if len(subnets) != 1 {
			break
		}
		if s, _ := subnets[0].(map[string]any); s["type"] == "dhcp4" && s["routes"] == nil {
			return
		}
	}
	t.Errorf("cloud-init's network config has no DHCP on %s: %s", mac, asJSON(nc))
}

// checkRenderedDHCP checks the files cloud-init 22.4's renderers write: a
// DHCP client on eth0 and no static route (ENI's "post-up route add" needs
// net-tools, which Debian's cloud images lack), with the link MTU where
// the source carries one (mtu > 0).
func checkRenderedDHCP(t *testing.T, source string, rendered map[string]map[string]string, mtu int) {
	t.Helper()
	m := strconv.Itoa(mtu)
	for _, c := range []struct{ renderer, path, want, mtu string }{
		{"eni", "etc/network/interfaces", "iface eth0 inet dhcp", "    mtu " + m + "\n"},
		{"netplan", "etc/netplan/50-cloud-init.yaml", "dhcp4: true", "mtu: " + m + "\n"},
		{"networkd", "etc/systemd/network/10-cloud-init-eth0.network", "DHCP=ipv4", "MTUBytes=" + m + "\n"},
		{"sysconfig", "etc/sysconfig/network-scripts/ifcfg-eth0", "BOOTPROTO=dhcp", "MTU=" + m + "\n"},
	} {
		body, ok := rendered[c.renderer][c.path]
		switch {
		case !ok:
			t.Errorf("%s, %s renderer: no %s among %v", source, c.renderer, c.path, keys(rendered[c.renderer]))
		case !strings.Contains(body, c.want):
			t.Errorf("%s, %s renderer: %s lacks %q:\n%s", source, c.renderer, c.path, c.want, body)
		case mtu > 0 && !strings.Contains(body, c.mtu):
			t.Errorf("%s, %s renderer: %s lacks the MTU (%q):\n%s", source, c.renderer, c.path, c.mtu, body)
		}
		for _, static := range []string{"route add", "inet static", "gateway", "GATEWAY", "Gateway=", "via:", "IPADDR"} {
			if strings.Contains(body, static) {
				t.Errorf("%s, %s renderer: %s has static %q:\n%s", source, c.renderer, c.path, static, body)
			}
		}
	}
}

// TestCloudInitRendersNetwork: on every path minicloud hands cloud-init a
// network config (network_data.json on the OpenStack tree and the config-2
// drive, NoCloud's network-config; the EC2 tree is in
// TestCloudInitReadsService), cloud-init's own renderers produce DHCP for a
// NIC the host's DHCP server answers, and a static address without any
// route for one it does not.
func TestCloudInitRendersNetwork(t *testing.T) {
	dhcp := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	static := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	static.Interfaces[0].Gateway = netip.Addr{}
	for _, tc := range []struct {
		name string
		inst *Instance
		dhcp bool
	}{{"dhcp", dhcp, true}, {"no-dhcp", static, false}} {
		t.Run(tc.name, func(t *testing.T) {
			nd := openstackNetworkData(tc.inst)
			nc, err := NoCloudFiles(tc.inst)
			if err != nil {
				t.Fatal(err)
			}
			var v2 map[string]any
			for _, f := range nc {
				if f.Name == "network-config" {
					if err := yaml.Unmarshal(f.Body, &v2); err != nil {
						t.Fatal(err)
					}
				}
			}
			for source, req := range map[string]any{
				"network_data.json":      map[string]any{"network_data": nd},
				"NoCloud network-config": map[string]any{"network_config": v2},
			} {
				r := cloudinittest.Render(t, req)
				if tc.dhcp {
					checkRenderedDHCP(t, source, r, 1450)
					continue
				}
				eni := r["eni"]["etc/network/interfaces"]
				if !strings.Contains(eni, "iface eth0 inet static") || !strings.Contains(eni, "address 10.0.0.5/24") ||
					!strings.Contains(eni, "mtu 1450") || strings.Contains(eni, "route") || strings.Contains(eni, "gateway") {
					t.Errorf("%s without DHCP, ENI renderer:\n%s", source, eni)
				}
				nw := r["networkd"]["etc/systemd/network/10-cloud-init-eth0.network"]
				if !strings.Contains(nw, "Address=10.0.0.5/24") || !strings.Contains(nw, "DHCP=no") || strings.Contains(nw, "Gateway") {
					t.Errorf("%s without DHCP, networkd renderer:\n%s", source, nw)
				}
			}
		})
	}
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

func asJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
