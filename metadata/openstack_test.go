package metadata

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

func TestOpenStackTree(t *testing.T) {
	e := newTestEnv(t, nil)
	versions := strings.Join(OpenStackVersions, "\n") + "\nlatest"
	e.expect(2, "/openstack", 200, versions)
	e.expect(2, "/openstack/", 200, versions)
	e.expect(2, "/openstack/latest/", 200, lines("meta_data.json", "user_data", "vendor_data.json", "network_data.json", "vendor_data2.json"))
	e.expect(3, "/openstack/latest/", 200, lines("meta_data.json", "vendor_data.json", "network_data.json", "vendor_data2.json"))
	e.expect(2, "/openstack/2012-08-10/", 200, lines("meta_data.json", "user_data"))
	e.expect(2, "/openstack/2012-08-10/network_data.json", 404, "")
	e.expect(2, "/openstack/latest/user_data", 200, "#cloud-config\nhostname: web1\n")
	e.expect(3, "/openstack/latest/user_data", 404, "")
	e.expect(2, "/openstack/latest/vendor_data.json", 200, "{}")
	e.expect(2, "/openstack/latest/vendor_data2.json", 200, "{}")
	e.expect(2, "/openstack/2030-01-01/meta_data.json", 404, "")
	e.expect(2, "/openstack/latest/../latest/meta_data.json", 404, "")

	for _, v := range []string{"latest", "2018-08-27", "2016-10-06"} {
		var md struct {
			UUID             string            `json:"uuid"`
			Name             string            `json:"name"`
			Hostname         string            `json:"hostname"`
			LaunchIndex      *int              `json:"launch_index"`
			AvailabilityZone string            `json:"availability_zone"`
			ProjectID        string            `json:"project_id"`
			PublicKeys       map[string]string `json:"public_keys"`
			Keys             []openstackKey    `json:"keys"`
			Meta             map[string]string `json:"meta"`
			Devices          []any             `json:"devices"`
			RandomSeed       string            `json:"random_seed"`
		}
		got := e.get(2, "/openstack/"+v+"/meta_data.json")
		if err := json.Unmarshal([]byte(got.body), &md); err != nil {
			t.Fatalf("%s meta_data.json: %v: %q", v, err, got.body)
		}
		key := testInstance(idA, "", "10.0.0.5", "52:54:00:00:00:0a").SSHKeys[0].Key
		if md.UUID != idA || md.Name != "web1" || md.Hostname != "web1" || md.LaunchIndex == nil || *md.LaunchIndex != 0 ||
			md.AvailabilityZone != "zone-a" || md.ProjectID != "proj1" || md.PublicKeys["alice"] != key ||
			len(md.Keys) != 1 || md.Keys[0] != (openstackKey{Name: "alice", Type: "ssh", Data: key}) ||
			md.Meta["role"] != "web" || md.Devices == nil || md.RandomSeed == "" {
			t.Errorf("%s meta_data.json = %+v", v, md)
		}
	}

	var nd osNetworkData
	got := e.get(2, "/openstack/latest/network_data.json")
	if err := json.Unmarshal([]byte(got.body), &nd); err != nil {
		t.Fatal(err)
	}
	if len(nd.Links) != 1 || nd.Links[0].MAC != "52:54:00:00:00:0a" || nd.Links[0].MTU != 1450 || nd.Links[0].Type != "phy" {
		t.Errorf("links = %+v", nd.Links)
	}
	if len(nd.Networks) != 1 {
		t.Fatalf("networks = %+v", nd.Networks)
	}
	// A NIC the host's DHCP server answers is described as Nova describes
	// one on a subnet with DHCP: "ipv4_dhcp", no address, no routes.
	n := nd.Networks[0]
	if n.Type != "ipv4_dhcp" || n.IPAddress != "" || n.Netmask != "" || n.Link != nd.Links[0].ID || n.Routes != nil ||
		n.NetworkID != "default" {
		t.Errorf("network = %+v", n)
	}
	if !strings.Contains(got.body, `"type":"ipv4_dhcp"`) || strings.Contains(got.body, `"routes"`) || strings.Contains(got.body, `"ip_address"`) {
		t.Errorf("network_data.json = %s", got.body)
	}
	if len(nd.Services) != 1 || nd.Services[0] != (osService{Type: "dns", Address: "10.0.0.1"}) {
		t.Errorf("services = %+v", nd.Services)
	}
}

func TestOpenStackVendorData(t *testing.T) {
	inst := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	inst.VendorData = []byte("#cloud-config\npackages: [htop]\n")
	files, err := OpenStackFiles(inst, "latest")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f.Name != "vendor_data.json" {
			continue
		}
		var vd map[string]string
		if err := json.Unmarshal(f.Body, &vd); err != nil || vd["cloud-init"] != string(inst.VendorData) {
			t.Fatalf("vendor_data.json = %s (%v)", f.Body, err)
		}
		return
	}
	t.Fatal("no vendor_data.json")
}

// TestOpenStackNetworkDataWithoutDHCP: a NIC the host's DHCP server does
// not answer (no gateway) is described statically, in Nova's complete
// form, without any route and without a resolver.
func TestOpenStackNetworkDataWithoutDHCP(t *testing.T) {
	inst := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	inst.Interfaces[0].Gateway = netip.Addr{}
	b, err := json.Marshal(openstackNetworkData(inst))
	if err != nil {
		t.Fatal(err)
	}
	want := `"networks":[{"id":"network0","type":"ipv4","link":"mct0a1b2c3d0","ip_address":"10.0.0.5","netmask":"255.255.255.0","routes":[],"network_id":"default","services":[]}],"services":[]}`
	if !strings.HasSuffix(string(b), want) {
		t.Errorf("network_data.json = %s\nwant it to end in %s", b, want)
	}
}
