package metadata

import (
	"fmt"
	"strconv"

	"sigs.k8s.io/yaml"
)

// NoCloudFiles renders cloud-init's NoCloud seed: meta-data, user-data (empty
// when there is none: NoCloud needs the file), network-config (network
// config v2 with the fixed addresses, matched by MAC) and vendor-data when
// the operator set some.
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

func networkConfigV2(inst *Instance) map[string]any {
	eths := map[string]any{}
	for i, nic := range inst.Interfaces {
		e := map[string]any{
			"match":     map[string]any{"macaddress": nic.MAC.String()},
			"addresses": []string{nic.Address.String()},
			"mtu":       nic.MTU,
		}
		if i == 0 && nic.Gateway.IsValid() {
			e["routes"] = []any{map[string]any{"to": "0.0.0.0/0", "via": nic.Gateway.String()}}
			ns := map[string]any{"addresses": []string{nic.Gateway.String()}}
			if inst.Domain != "" {
				ns["search"] = []string{inst.Domain}
			}
			e["nameservers"] = ns
		}
		eths["eth"+strconv.Itoa(i)] = e
	}
	return map[string]any{"version": 2, "ethernets": eths}
}
