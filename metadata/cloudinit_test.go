package metadata

import (
	"encoding/json"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/metadata/internal/cloudinittest"
)

// TestCloudInitReadsService: cloud-init 22.4's own Ec2 (IMDSv2) and
// OpenStack readers crawl the service and get this guest's data, and its
// network_data converter yields a static configuration.
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
	checkStaticNetConfig(t, got.NetworkConf, "52:54:00:00:00:0a", "10.0.0.5", "10.0.0.1")
}

// checkStaticNetConfig checks cloud-init's network config v1 from our
// network_data.json: a physical NIC with a static address and the gateway.
func checkStaticNetConfig(t *testing.T, nc map[string]any, mac, ip, gw string) {
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
		s, _ := subnets[0].(map[string]any)
		if s["type"] == "static" && s["address"] == ip && s["netmask"] == "255.255.255.0" && strings.Contains(asJSON(s["routes"]), gw) {
			return
		}
	}
	t.Errorf("cloud-init's network config has no static %s on %s via %s: %s", ip, mac, gw, asJSON(nc))
}

func asJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
