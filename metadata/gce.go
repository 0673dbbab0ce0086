package metadata

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"maps"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"unicode/utf8"
)

// gnode is one path of the GCE tree. GCE names paths in dash-case but keys
// recursive JSON in camelCase, and serves numbered directories
// (network-interfaces/0/) as JSON arrays, so the tree keeps both names.
type gnode struct {
	value    any // leaf value as JSON renders it
	text     []byte
	dir      bool
	array    bool
	order    []string
	children map[string]*gnode
	jsonKey  map[string]string
	listing  []byte
	// dynamic leaves are answered per request (identity tokens): listed,
	// but left out of recursive renderings as GCE leaves them out.
	dynamic bool
	// answers are n's rendered answers by kind, made on first use.
	answers [numGCEKinds]atomic.Pointer[gceAnswer]
}

func gleaf(s string) *gnode { return &gnode{value: s, text: []byte(s)} }

func gjsonLeaf(v any) *gnode {
	b, _ := json.Marshal(v)
	return &gnode{value: v, text: b}
}

type gdirBuilder struct{ n *gnode }

func gdir() *gdirBuilder {
	return &gdirBuilder{n: &gnode{dir: true, children: map[string]*gnode{}, jsonKey: map[string]string{}}}
}

// add serves child under name; recursive JSON keys it as camelCase(name),
// or verbatim for attribute keys (keepKey).
func (b *gdirBuilder) add(name string, child *gnode, keepKey bool) *gdirBuilder {
	b.n.children[name] = child
	b.n.order = append(b.n.order, name)
	if keepKey {
		b.n.jsonKey[name] = name
	} else {
		b.n.jsonKey[name] = camelCase(name)
	}
	return b
}

func (b *gdirBuilder) done() *gnode {
	sort.Strings(b.n.order)
	var buf bytes.Buffer
	for _, name := range b.n.order {
		buf.WriteString(name)
		if b.n.children[name].dir {
			buf.WriteByte('/')
		}
		buf.WriteByte('\n')
	}
	b.n.listing = buf.Bytes()
	return b.n
}

func (b *gdirBuilder) doneArray() *gnode {
	n := b.done()
	n.array = true
	sort.Slice(n.order, func(i, j int) bool {
		a, _ := strconv.Atoi(n.order[i])
		c, _ := strconv.Atoi(n.order[j])
		return a < c
	})
	return n
}

func camelCase(s string) string {
	parts := strings.Split(s, "-")
	for i := 1; i < len(parts); i++ {
		if parts[i] != "" {
			parts[i] = strings.ToUpper(parts[i][:1]) + parts[i][1:]
		}
	}
	return strings.Join(parts, "")
}

// gceTree renders computeMetadata/v1/ for one instance.
func gceTree(inst *Instance) *gnode {
	projectPath := "projects/" + inst.Project
	attrs := gdir()
	for _, k := range slices.Sorted(maps.Keys(inst.Attributes)) {
		if k != "" && !strings.ContainsAny(k, "/ ") && k != "user-data" && k != "ssh-keys" && k != "user-data-encoding" {
			attrs.add(k, gleaf(inst.Attributes[k]), true)
		}
	}
	if inst.UserData != nil {
		if utf8.Valid(inst.UserData) {
			attrs.add("user-data", gleaf(string(inst.UserData)), true)
		} else {
			attrs.add("user-data", gleaf(base64.StdEncoding.EncodeToString(inst.UserData)), true)
			attrs.add("user-data-encoding", gleaf("base64"), true)
		}
	}
	if len(inst.SSHKeys) > 0 {
		// cloud-init's GCE datasource takes keys of the user "cloudinit"
		// (or the distro's default user) from "user:key" lines.
		var lines []string
		for _, k := range inst.SSHKeys {
			lines = append(lines, "cloudinit:"+k.Key)
		}
		attrs.add("ssh-keys", gleaf(strings.Join(lines, "\n")), true)
	}

	nics := gdir()
	for i, nic := range inst.Interfaces {
		d := gdir()
		if nic.Gateway.IsValid() {
			d.add("gateway", gleaf(nic.Gateway.String()), false)
		}
		d.add("ip", gleaf(nic.Address.Addr().String()), false)
		d.add("mac", gleaf(nic.MAC.String()), false)
		d.add("mtu", gjsonLeaf(nic.MTU), false)
		d.add("network", gleaf(projectPath+"/networks/"+nic.Network), false)
		d.add("subnetmask", gleaf(net.IP(net.CIDRMask(nic.Address.Bits(), 32)).String()), false)
		nics.add(strconv.Itoa(i), d.done(), false)
	}

	// GCE lists the default service account under its alias and its
	// email. minicloud has no OAuth tokens (no "token", no "scopes"), only
	// identity tokens signed by the API.
	email := "default@" + inst.Project + "." + inst.Domain
	account := func() *gnode {
		return gdir().
			add("aliases", gleaf("default"), false).
			add("email", gleaf(email), false).
			add("identity", &gnode{dynamic: true}, false).done()
	}
	accounts := gdir().add("default", account(), false).add(email, account(), true).done()

	tags := append([]string{}, inst.Tags...)
	instance := gdir().
		add("attributes", attrs.done(), false).
		add("hostname", gleaf(inst.FQDN()), false).
		add("id", gleaf(inst.ID), false).
		add("image", gleaf(projectPath+"/global/images/"+inst.Image), false).
		add("machine-type", gleaf(projectPath+"/machineTypes/"+inst.InstanceType), false).
		add("name", gleaf(inst.Name), false).
		add("network-interfaces", nics.doneArray(), false).
		add("service-accounts", accounts, false).
		add("tags", gjsonLeaf(tags), false).
		add("zone", gleaf(projectPath+"/zones/"+inst.AvailabilityZone), false)
	project := gdir().
		add("attributes", gdir().done(), false).
		add("project-id", gleaf(inst.Project), false)
	return gdir().add("instance", instance.done(), false).add("project", project.done(), false).done()
}

func (n *gnode) isDir() bool { return n.dir }

func (n *gnode) child(name string) *gnode { return n.children[name] }

func (n *gnode) eachChild(f func(string, *gnode)) {
	for name, c := range n.children {
		f(name, c)
	}
}

// jsonValue is the recursive JSON form of n.
func (n *gnode) jsonValue() any {
	if !n.dir {
		return n.value
	}
	if n.array {
		out := make([]any, 0, len(n.order))
		for _, name := range n.order {
			out = append(out, n.children[name].jsonValue())
		}
		return out
	}
	out := make(map[string]any, len(n.order))
	for _, name := range n.order {
		if c := n.children[name]; !c.dynamic {
			out[n.jsonKey[name]] = c.jsonValue()
		}
	}
	return out
}

// flatText is the recursive alt=text form: one "path value" line per leaf.
func (n *gnode) flatText(prefix string, buf *bytes.Buffer) {
	if !n.dir {
		buf.WriteString(prefix)
		buf.WriteByte(' ')
		buf.Write(n.text)
		buf.WriteByte('\n')
		return
	}
	for _, name := range n.order {
		if n.children[name].dynamic {
			continue
		}
		p := name
		if prefix != "" {
			p = prefix + "/" + name
		}
		n.children[name].flatText(p, buf)
	}
}
