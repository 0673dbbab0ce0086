// Package invariants checks what must hold in a minicloud cluster however
// it was treated (issue 13, section 3): it compares the cloud's record in
// etcd with what every host really has (libvirt domains, taps, VM
// directories, nftables port elements) and reports each disagreement.
//
// The checking is a pure function (Check) over a Snapshot, so it is tested
// with hosts described in memory; Audit takes snapshots through the small
// Hosts interface (the lab's adapter reads real hosts with virsh, ip, ls
// and nft) and etcd (ReadCloud), and retries until the cloud has converged
// or a settle timeout has passed: a cluster that is still reacting to a
// fault is not wrong, one that never gets there is.
package invariants

import (
	"fmt"
	"sort"
	"strings"

	"github.com/minicloud/minicloud/agent/hypervisor"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/nic"
)

// Invariant names, as they head each violation.
const (
	// OneHost: a VM runs on one host at most (two would share its
	// addresses and write its data from two places).
	OneHost = "one-host"
	// OneDefinition: a VM is defined in one host's libvirt at most (a
	// definition left on a host it moved away from could be started
	// again there).
	OneDefinition = "one-definition"
	// Orphan: no domain, tap, VM directory, nftables port element or IPAM
	// address exists without its VM, the one etcd assigns to that host.
	Orphan = "orphan"
	// Settled: every VM a create accepted ends RUNNING, STOPPED (asked to,
	// or with a reason) or ERROR with a reason, and its host agrees.
	Settled = "settled"
	// Claims: capacity claims equal the sum of the VMs placed
	// (scheduler.VerifyClaims).
	Claims = "claims"
	// Deleted: a VM the caller deleted exists nowhere.
	Deleted = "deleted"
	// Unique: no address or MAC is held by two VMs.
	Unique = "unique"
	// Readable: every host could be read (an unreadable host hides every
	// other violation on it).
	Readable = "readable"
)

// Violation is one disagreement, e.g. {Orphan, "host2", "domain mc-… belongs to no VM"}.
type Violation struct {
	Invariant string
	// Where is the host, VM or key the violation is about.
	Where  string
	Detail string
}

func (v Violation) String() string { return fmt.Sprintf("%s: %s: %s", v.Invariant, v.Where, v.Detail) }

// Domain is a libvirt domain of a host.
type Domain struct {
	Name string
	// Running is true for an active domain (running or paused: it holds
	// the guest's memory and disk).
	Running bool
}

// PortElement is one element of the agent's per-port nftables sets: a port
// (interface name) and a MAC or IPv4 address it may send from.
type PortElement struct {
	Set  string
	Port string
	Addr string
}

// Observation is what one host has, read at one moment.
type Observation struct {
	Domains []Domain
	// Links are the names of every network interface of the host.
	Links []string
	// VMDirs are the entries of the agent's VM state directory
	// (<data-dir>/agent/vms), one per VM id. Trashed VMs (agent/trash) are
	// kept on purpose for a grace period and are not listed.
	VMDirs       []string
	PortElements []PortElement
}

// Address is one of a VM's network addresses.
type Address struct {
	Network, IP, MAC string
}

// VM is a VM as etcd records it.
type VM struct {
	ID, Name, Project string
	// Host is status.host: the only host that may hold anything of it.
	Host        string
	Phase       minicloudv1.VMPhase
	WantStopped bool
	Reason      string
	Message     string
	Addresses   []Address
}

// IPAMEntry is one ipam/<network id>/<ip> key and the VM id it holds.
type IPAMEntry struct {
	Network, IP, VMID string
}

// Cloud is etcd's side of a snapshot.
type Cloud struct {
	VMs  map[string]VM
	IPAM []IPAMEntry
	// ClaimProblems are scheduler.VerifyClaims' findings.
	ClaimProblems []string
}

// Snapshot is the cloud and every host it has.
type Snapshot struct {
	Cloud Cloud
	Hosts map[string]Observation
	// HostErrors are the hosts that could not be read, and why.
	HostErrors map[string]error
}

// domainPrefix starts the libvirt name of every minicloud domain.
const domainPrefix = hypervisor.DomainNamePrefix

// Check returns every violation in s, sorted; deleted are VM ids the caller
// deleted (and saw deleted), which must exist nowhere.
func Check(s Snapshot, deleted []string) []Violation {
	c := checker{s: s}
	c.readable()
	c.hosts()
	c.settled()
	c.unique()
	c.ipam()
	for _, p := range s.Cloud.ClaimProblems {
		c.bad(Claims, "etcd", "%s", p)
	}
	c.deleted(deleted)
	sort.Slice(c.out, func(i, j int) bool { return c.out[i].String() < c.out[j].String() })
	return c.out
}

type checker struct {
	s   Snapshot
	out []Violation
}

func (c *checker) bad(inv, where, format string, args ...any) {
	c.out = append(c.out, Violation{Invariant: inv, Where: where, Detail: fmt.Sprintf(format, args...)})
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func (c *checker) readable() {
	for _, h := range sortedKeys(c.s.HostErrors) {
		c.bad(Readable, h, "cannot read the host: %v", c.s.HostErrors[h])
	}
}

// vmOfPort returns the VM whose tap port is; "" if port is not a
// minicloud tap or no VM's taps are named so.
func (c *checker) vmOfPort(port string) (id string, tap bool) {
	if !strings.HasPrefix(port, nic.TapPrefix) {
		return "", false
	}
	for id := range c.s.Cloud.VMs {
		if isTapOf(port, id) {
			return id, true
		}
	}
	return "", true
}

// isTapOf reports whether port is tap <n> of VM id (nic.TapName).
func isTapOf(port, id string) bool {
	rest, ok := strings.CutPrefix(port, nic.TapNamePrefix(id))
	if !ok || rest == "" {
		return false
	}
	return strings.Trim(rest, "0123456789") == ""
}

// owned checks that what host has of VM id (a domain, a tap, ...) belongs
// to a VM that etcd assigns to host.
func (c *checker) owned(host, what, id string) {
	vm, ok := c.s.Cloud.VMs[id]
	switch {
	case id == "" || !ok:
		c.bad(Orphan, host, "%s belongs to no VM", what)
	case vm.Host != host:
		c.bad(Orphan, host, "%s belongs to VM %s (%s), which etcd assigns to %q", what, vm.Name, id, vm.Host)
	}
}

func (c *checker) hosts() {
	definedOn, runningOn := map[string][]string{}, map[string][]string{}
	for _, h := range sortedKeys(c.s.Hosts) {
		o := c.s.Hosts[h]
		seen := map[string]bool{}
		for _, d := range o.Domains {
			id, ok := strings.CutPrefix(d.Name, domainPrefix)
			if !ok {
				continue // not minicloud's
			}
			if seen[id] {
				c.bad(OneDefinition, h, "domain %s defined twice", d.Name)
			}
			seen[id] = true
			definedOn[id] = append(definedOn[id], h)
			if d.Running {
				runningOn[id] = append(runningOn[id], h)
			}
			c.owned(h, "domain "+d.Name, id)
		}
		for _, l := range o.Links {
			if id, tap := c.vmOfPort(l); tap {
				c.owned(h, "tap "+l, id)
			}
		}
		for _, d := range o.VMDirs {
			c.owned(h, "VM directory "+d, d)
		}
		for _, e := range o.PortElements {
			id, tap := c.vmOfPort(e.Port)
			if !tap {
				continue // an adopted veth: not a VM's
			}
			what := fmt.Sprintf("nftables %s element %s . %s", e.Set, e.Port, e.Addr)
			c.owned(h, what, id)
			if vm, ok := c.s.Cloud.VMs[id]; ok && vm.Host == h && !vm.hasAddr(e.Addr) {
				c.bad(Orphan, h, "%s: VM %s (%s) has no such address", what, vm.Name, id)
			}
		}
	}
	for _, id := range sortedKeys(definedOn) {
		if on := definedOn[id]; len(on) > 1 {
			c.bad(OneDefinition, id, "defined on %s", strings.Join(on, ", "))
		}
		if on := runningOn[id]; len(on) > 1 {
			c.bad(OneHost, id, "running on %s", strings.Join(on, ", "))
		}
	}
	// What etcd says runs must run where it says.
	for _, id := range sortedKeys(c.s.Cloud.VMs) {
		vm := c.s.Cloud.VMs[id]
		if _, read := c.s.Hosts[vm.Host]; !read {
			continue
		}
		running := false
		for _, h := range runningOn[id] {
			running = running || h == vm.Host
		}
		switch {
		case vm.Phase == minicloudv1.VMPhase_VM_PHASE_RUNNING && !running:
			c.bad(Settled, vm.label(), "RUNNING in etcd but no domain runs on %s (lost)", vm.Host)
		case vm.Phase == minicloudv1.VMPhase_VM_PHASE_STOPPED && running:
			c.bad(Settled, vm.label(), "STOPPED in etcd but its domain runs on %s", vm.Host)
		}
	}
}

func (vm VM) label() string { return fmt.Sprintf("%s/%s (%s)", vm.Project, vm.Name, vm.ID) }

func (vm VM) hasAddr(addr string) bool {
	for _, a := range vm.Addresses {
		if strings.EqualFold(a.MAC, addr) || a.IP == addr {
			return true
		}
	}
	return false
}

func (c *checker) settled() {
	for _, id := range sortedKeys(c.s.Cloud.VMs) {
		vm := c.s.Cloud.VMs[id]
		why := vm.Reason
		if why == "" {
			why = vm.Message
		}
		switch vm.Phase {
		case minicloudv1.VMPhase_VM_PHASE_RUNNING:
			if vm.WantStopped {
				c.bad(Settled, vm.label(), "RUNNING, but its spec asks for it stopped")
			}
		case minicloudv1.VMPhase_VM_PHASE_STOPPED:
			if !vm.WantStopped && why == "" {
				c.bad(Settled, vm.label(), "STOPPED without a reason, but its spec asks for it running")
			}
		case minicloudv1.VMPhase_VM_PHASE_ERROR:
			if why == "" {
				c.bad(Settled, vm.label(), "ERROR without a reason")
			}
		default:
			c.bad(Settled, vm.label(), "still %s (host %q, reason %q)", vm.Phase, vm.Host, why)
		}
	}
}

func (c *checker) unique() {
	ips, macs := map[string]string{}, map[string]string{}
	for _, id := range sortedKeys(c.s.Cloud.VMs) {
		vm := c.s.Cloud.VMs[id]
		for _, a := range vm.Addresses {
			if a.IP != "" {
				k := a.Network + " " + a.IP
				if other, ok := ips[k]; ok && other != vm.label() {
					c.bad(Unique, k, "held by %s and %s", other, vm.label())
				}
				ips[k] = vm.label()
			}
			if a.MAC != "" {
				k := strings.ToLower(a.MAC)
				if other, ok := macs[k]; ok && other != vm.label() {
					c.bad(Unique, "MAC "+k, "held by %s and %s", other, vm.label())
				}
				macs[k] = vm.label()
			}
		}
	}
}

func (c *checker) ipam() {
	for _, e := range c.s.Cloud.IPAM {
		where := "ipam/" + e.Network + "/" + e.IP
		vm, ok := c.s.Cloud.VMs[e.VMID]
		switch {
		case !ok:
			c.bad(Orphan, where, "held for VM %s, which does not exist", e.VMID)
		case !vm.hasAddr(e.IP):
			c.bad(Orphan, where, "held for %s, which has no such address", vm.label())
		}
	}
}

func (c *checker) deleted(ids []string) {
	for _, id := range ids {
		if vm, ok := c.s.Cloud.VMs[id]; ok {
			c.bad(Deleted, id, "still in etcd as %s, %s", vm.label(), vm.Phase)
		}
		for _, e := range c.s.Cloud.IPAM {
			if e.VMID == id {
				c.bad(Deleted, id, "still holds ipam/%s/%s", e.Network, e.IP)
			}
		}
		for _, h := range sortedKeys(c.s.Hosts) {
			o := c.s.Hosts[h]
			for _, d := range o.Domains {
				if d.Name == domainPrefix+id {
					c.bad(Deleted, id, "domain %s still defined on %s", d.Name, h)
				}
			}
			for _, d := range o.VMDirs {
				if d == id {
					c.bad(Deleted, id, "VM directory still on %s", h)
				}
			}
			for _, l := range o.Links {
				if isTapOf(l, id) {
					c.bad(Deleted, id, "tap %s still on %s", l, h)
				}
			}
		}
	}
}
