package metadata

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// OpenStackVersions are the dated versions Nova lists at /openstack, oldest
// first; "latest" follows them. cloud-init 22.4 picks the newest it knows
// (2018-08-27) from this listing.
var OpenStackVersions = []string{
	"2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
	"2016-10-06", "2017-02-22", "2018-08-27",
}

// OpenStackLatest is the dated version "latest" stands for.
const OpenStackLatest = "2018-08-27"

var (
	openstackVersionSet     = toSet(append(append([]string(nil), OpenStackVersions...), "latest"))
	openstackVersionListing = []byte(strings.Join(OpenStackVersions, "\n") + "\nlatest")
)

// File is one rendered metadata document, shared by the HTTP trees and the
// config drive so both always say the same thing.
type File struct {
	Name string
	Body []byte
}

// OpenStackFiles renders the documents Nova serves under
// openstack/<version>/, with the version gates Nova applies.
func OpenStackFiles(inst *Instance, version string) ([]File, error) {
	if version == "latest" {
		version = OpenStackLatest
	}
	if !openstackVersionSet[version] {
		return nil, fmt.Errorf("unknown OpenStack metadata version %q", version)
	}
	md, err := openstackMetaData(inst, version)
	if err != nil {
		return nil, err
	}
	files := []File{{Name: "meta_data.json", Body: md}}
	if inst.UserData != nil {
		files = append(files, File{Name: "user_data", Body: inst.UserData})
	}
	if version >= "2013-10-17" {
		vd, err := openstackVendorData(inst)
		if err != nil {
			return nil, err
		}
		files = append(files, File{Name: "vendor_data.json", Body: vd})
	}
	if version >= "2015-10-15" {
		nd, err := json.Marshal(openstackNetworkData(inst))
		if err != nil {
			return nil, fmt.Errorf("network_data.json: %w", err)
		}
		files = append(files, File{Name: "network_data.json", Body: nd})
	}
	if version >= "2016-10-06" {
		files = append(files, File{Name: "vendor_data2.json", Body: []byte("{}")})
	}
	return files, nil
}

type openstackKey struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Data string `json:"data"`
}

func openstackMetaData(inst *Instance, version string) ([]byte, error) {
	md := map[string]any{
		"uuid":              inst.ID,
		"name":              inst.Name,
		"hostname":          inst.Hostname,
		"launch_index":      inst.LaunchIndex,
		"availability_zone": inst.AvailabilityZone,
		"meta":              labelsOrEmpty(inst.Attributes),
		"files":             []any{},
	}
	if len(inst.SSHKeys) > 0 {
		pk := map[string]string{}
		keys := make([]openstackKey, 0, len(inst.SSHKeys))
		for _, k := range inst.SSHKeys {
			pk[k.Name] = k.Key
			keys = append(keys, openstackKey{Name: k.Name, Type: "ssh", Data: k.Key})
		}
		md["public_keys"] = pk
		if version >= "2016-10-06" {
			md["keys"] = keys
		}
	}
	if version >= "2013-04-04" {
		seed := make([]byte, 512)
		if _, err := rand.Read(seed); err != nil {
			return nil, fmt.Errorf("random_seed: %w", err)
		}
		md["random_seed"] = base64.StdEncoding.EncodeToString(seed)
	}
	if version >= "2015-10-15" {
		md["project_id"] = inst.Project
	}
	if version >= "2016-06-30" {
		md["devices"] = []any{}
	}
	b, err := json.Marshal(md)
	if err != nil {
		return nil, fmt.Errorf("meta_data.json: %w", err)
	}
	return b, nil
}

func labelsOrEmpty(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// openstackVendorData wraps operator cloud-config the way cloud-init's
// OpenStack datasource unwraps it: {"cloud-init": "<cloud-config>"}.
func openstackVendorData(inst *Instance) ([]byte, error) {
	if len(inst.VendorData) == 0 {
		return []byte("{}"), nil
	}
	return json.Marshal(map[string]string{"cloud-init": string(inst.VendorData)})
}

type osLink struct {
	ID   string `json:"id"`
	VIF  string `json:"vif_id"`
	Type string `json:"type"`
	MTU  int    `json:"mtu"`
	MAC  string `json:"ethernet_mac_address"`
}

type osRoute struct {
	Network string `json:"network"`
	Netmask string `json:"netmask"`
	Gateway string `json:"gateway"`
}

type osService struct {
	Type    string `json:"type"`
	Address string `json:"address"`
}

// osNetwork is one entry of network_data.json's "networks". An
// "ipv4_dhcp" entry carries only id, type, link and network_id, as Nova
// writes it; a static "ipv4" one also address, netmask, routes and
// services (pointers: present, if empty, only there).
type osNetwork struct {
	ID        string       `json:"id"`
	Type      string       `json:"type"`
	Link      string       `json:"link"`
	IPAddress string       `json:"ip_address,omitempty"`
	Netmask   string       `json:"netmask,omitempty"`
	Routes    *[]osRoute   `json:"routes,omitempty"`
	NetworkID string       `json:"network_id"`
	Services  *[]osService `json:"services,omitempty"`
}

type osNetworkData struct {
	Links    []osLink    `json:"links"`
	Networks []osNetwork `json:"networks"`
	Services []osService `json:"services"`
}

// openstackNetworkData describes every NIC (link type "phy": every
// network_data.json consumer, cloud-init and glean alike, treats it as a
// physical NIC, with the network's MTU) the way Nova does
// (nova/virt/netutils.py): a NIC the host's DHCP server answers is
// "ipv4_dhcp", so every cloud-init renderer (ENI, netplan, networkd,
// sysconfig) runs a DHCP client, and the default route, the resolver, the
// search domain and the MTU come from the DHCP answer. A static "ipv4"
// entry would make cloud-init's ENI renderer write the default route as
// "post-up route add … || true", which silently does nothing on an image
// without net-tools (Debian's own cloud images). Only a NIC without DHCP
// (no gateway) is static, and then without routes. The resolver (the
// gateway, where the agent answers DNS) is also listed in the top-level
// "services", as Nova lists its subnets' DNS servers.
func openstackNetworkData(inst *Instance) osNetworkData {
	nd := osNetworkData{Links: []osLink{}, Networks: []osNetwork{}, Services: []osService{}}
	for i, nic := range inst.Interfaces {
		link := nic.TapName
		nd.Links = append(nd.Links, osLink{ID: link, VIF: link, Type: "phy", MTU: nic.MTU, MAC: nic.MAC.String()})
		n := osNetwork{ID: "network" + strconv.Itoa(i), Type: "ipv4_dhcp", Link: link, NetworkID: nic.Network}
		if !nic.DHCP() {
			n.Type = "ipv4"
			n.IPAddress = nic.Address.Addr().String()
			n.Netmask = net.IP(net.CIDRMask(nic.Address.Bits(), 32)).String()
			n.Routes, n.Services = &[]osRoute{}, &[]osService{}
		}
		nd.Networks = append(nd.Networks, n)
		if i == 0 && nic.Gateway.IsValid() {
			nd.Services = append(nd.Services, osService{Type: "dns", Address: nic.Gateway.String()})
		}
	}
	return nd
}

func openstackTree(inst *Instance) (*node, error) {
	root := buildDir()
	for _, v := range append(append([]string(nil), OpenStackVersions...), "latest") {
		files, err := OpenStackFiles(inst, v)
		if err != nil {
			return nil, err
		}
		d := buildDir()
		for _, f := range files {
			ct := "application/json"
			if f.Name == "user_data" {
				ct = "application/octet-stream"
			}
			d.add(f.Name, leaf(f.Body, ct))
		}
		root.add(v, d.done())
	}
	n := root.done()
	n.body = openstackVersionListing
	return n, nil
}
