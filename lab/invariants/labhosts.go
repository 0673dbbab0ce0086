package invariants

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/minicloud/minicloud/lab"
)

// LabHosts reads the hosts of a lab (package lab) as a person on each
// would: virsh, ip, ls and nft run inside the host's namespaces
// (lab.Lab.Output).
type LabHosts struct{ Lab *lab.Lab }

// Names are the lab's hosts.
func (h LabHosts) Names() []string { return h.Lab.HostNames() }

// The agent's nftables sets that hold one element per guest port
// (agent/network/linux/ruleset.go: table bridge minicloud).
var portSets = []string{"port_mac", "port_ip4"}

// Observe reads host's domains, links, VM directories and port sets.
func (h LabHosts) Observe(ctx context.Context, host string) (Observation, error) {
	var o Observation
	all, err := h.Lab.Output(ctx, host, "virsh", "list", "--all", "--name")
	if err != nil {
		return o, err
	}
	active, err := h.Lab.Output(ctx, host, "virsh", "list", "--name")
	if err != nil {
		return o, err
	}
	running := map[string]bool{}
	for _, d := range strings.Fields(active) {
		running[d] = true
	}
	for _, d := range strings.Fields(all) {
		o.Domains = append(o.Domains, Domain{Name: d, Running: running[d]})
	}

	links, err := h.Lab.Output(ctx, host, "ip", "-j", "link", "show")
	if err != nil {
		return o, err
	}
	if o.Links, err = parseIPLinks([]byte(links)); err != nil {
		return o, fmt.Errorf("%s: ip -j link: %w", host, err)
	}

	vms := filepath.Join(h.Lab.AgentStateDir(host), "vms")
	dirs, err := h.Lab.Output(ctx, host, "ls", "-1", "-A", vms)
	if err != nil && !strings.Contains(err.Error(), "No such file") {
		return o, err
	}
	o.VMDirs = strings.Fields(dirs)

	for _, set := range portSets {
		out, err := h.Lab.Output(ctx, host, "nft", "-j", "list", "set", "bridge", "minicloud", set)
		if err != nil {
			if strings.Contains(err.Error(), "No such file") {
				continue // the agent has not made its table yet
			}
			return o, err
		}
		els, err := parseNftSet([]byte(out))
		if err != nil {
			return o, fmt.Errorf("%s: nft set %s: %w", host, set, err)
		}
		o.PortElements = append(o.PortElements, els...)
	}
	return o, nil
}

func parseIPLinks(b []byte) ([]string, error) {
	var links []struct {
		IfName string `json:"ifname"`
	}
	if err := json.Unmarshal(b, &links); err != nil {
		return nil, err
	}
	out := make([]string, 0, len(links))
	for _, l := range links {
		out = append(out, l.IfName)
	}
	return out, nil
}

// parseNftSet reads `nft -j list set` of a set keyed by ifname . address:
// its elements are {"concat": [port, addr]}.
func parseNftSet(b []byte) ([]PortElement, error) {
	var doc struct {
		Nftables []struct {
			Set *struct {
				Name string            `json:"name"`
				Elem []json.RawMessage `json:"elem"`
			} `json:"set"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, err
	}
	var out []PortElement
	for _, item := range doc.Nftables {
		if item.Set == nil {
			continue
		}
		for _, raw := range item.Set.Elem {
			var e struct {
				Concat []string `json:"concat"`
			}
			if err := json.Unmarshal(raw, &e); err != nil || len(e.Concat) != 2 {
				return nil, fmt.Errorf("element %s: want {\"concat\": [port, address]}", raw)
			}
			out = append(out, PortElement{Set: item.Set.Name, Port: e.Concat[0], Addr: e.Concat[1]})
		}
	}
	return out, nil
}
