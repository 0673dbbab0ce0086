package metadata

import (
	"fmt"
	"strconv"

	"sigs.k8s.io/yaml"
)

// NoCloudFiles renders cloud-init's NoCloud seed: meta-data, user-data (empty
// when there is none: NoCloud needs the file), network-config (network
// config v2, NICs matched by MAC: DHCP where the host serves it, as in
// network_data.json) and vendor-data when the operator set some.
func NoCloudFiles(inst *Instance) ([]File, error) {
	md := map[string]any{
		"instance-id":       inst.ID,
		"local-hostname":    inst.Hostname,
		"hostname":          inst.Hostname,
		"availability-zone": inst.AvailabilityZone,
	}
	if len(inst.SSHKeys) > 0 {
		keys := make([]string, 0, len(inst.SSHKeys))
		for _, k := range inst.SSHKeys {
			keys = append(keys, k.Key)
		}
		md["public-keys"] = keys
	}
	mdYAML, err := yaml.Marshal(md)
	if err != nil {
		return nil, fmt.Errorf("meta-data: %w", err)
	}
	netYAML, err := yaml.Marshal(networkConfigV2(inst))
	if err != nil {
		return nil, fmt.Errorf("network-config: %w", err)
	}
	ud := inst.UserData
	if ud == nil {
		ud = []byte{}
	}
	files := []File{
		{Name: "meta-data", Body: mdYAML},
		{Name: "user-data", Body: ud},
		{Name: "network-config", Body: netYAML},
	}
	if len(inst.VendorData) > 0 {
		files = append(files, File{Name: "vendor-data", Body: inst.VendorData})
	}
	return files, nil
}

// networkConfigV2 is network_data.json's description in network config v2:
// "dhcp4" for a NIC the host's DHCP server answers (route, resolver, search
// domain and MTU come from the answer), a static address without routes for
// one it does not (see openstackNetworkData).
func networkConfigV2(inst *Instance) map[string]any {
	eths := map[string]any{}
	for i, nic := range inst.Interfaces {
		e := map[string]any{
			"match": map[string]any{"macaddress": nic.MAC.String()},
			"mtu":   nic.MTU,
		}
		if nic.DHCP() {
			e["dhcp4"] = true
		} else {
			e["addresses"] = []string{nic.Address.String()}
		}
		eths["eth"+strconv.Itoa(i)] = e
	}
	return map[string]any{"version": 2, "ethernets": eths}
}
