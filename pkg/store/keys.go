// Package store is minicloud's etcd layout: the keys every component agrees
// on and typed helpers over go.etcd.io/etcd/client/v3. Values are protobuf
// (binary wire format). docs/architecture.md has the same table for people.
//
// Key layout (prefix /minicloud/ omitted):
//
//	vms/spec/<id>                    VM with meta+spec (status cleared)     written by API
//	vms/status/<id>                  VMStatus                               written by scheduler, agent (via API)
//	vms/userdata/<id>                raw user-data bytes                    written by API at create
//	vms/names/<project>/<name>       VM id (uniqueness index)               written by API
//	vms/requests/<project>/<reqid>   VM id (idempotent create)              written by API, leased (24h)
//	vms/events/<id>/<seq>            Event                                  API, scheduler, agent (via API)
//	images/<name>                    Image
//	flavors/<name>                   Flavor
//	networks/<project>/<name>        Network
//	servergroups/<project>/<name>    ServerGroup
//	hosts/spec/<name>                Host (registration, disabled flag)     written by API
//	hosts/alive/<name>               lease id (attached to the lease)       written by API on heartbeat
//	hosts/alloc/<name>               HostAllocation (claims summed)         written by scheduler txn; compared by mod revision
//	claims/<host>/<vmid>             Claim (resources of one VM)            written in the same txn as hosts/alloc
//	ipam/<network-id>/<ip>           VM id                                  written by API in the create txn
//	vnis/<vni, 8 digits>             network id                             written by API in the network create/delete txn
//	schedulers/<replica-id>          replica id (attached to its lease)     written by each scheduler replica
//
// Spec and status are separate keys so that users and hosts never write the
// same key; the user-data has its own key so lists never carry it.
package store

import (
	"fmt"
	"strings"
)

// Prefix is the root of every minicloud key.
const Prefix = "/minicloud/"

const (
	VMSpecPrefix      = Prefix + "vms/spec/"
	VMStatusPrefix    = Prefix + "vms/status/"
	VMUserDataPrefix  = Prefix + "vms/userdata/"
	VMNamePrefix      = Prefix + "vms/names/"
	VMRequestPrefix   = Prefix + "vms/requests/"
	VMEventPrefix     = Prefix + "vms/events/"
	ImagePrefix       = Prefix + "images/"
	FlavorPrefix      = Prefix + "flavors/"
	NetworkPrefix     = Prefix + "networks/"
	ServerGroupPrefix = Prefix + "servergroups/"
	HostSpecPrefix    = Prefix + "hosts/spec/"
	HostAlivePrefix   = Prefix + "hosts/alive/"
	HostAllocPrefix   = Prefix + "hosts/alloc/"
	ClaimPrefix       = Prefix + "claims/"
	IPAMPrefix        = Prefix + "ipam/"
	VNIPrefix         = Prefix + "vnis/"
	SchedulerPrefix   = Prefix + "schedulers/"
)

func VMSpecKey(id string) string            { return VMSpecPrefix + id }
func VMStatusKey(id string) string          { return VMStatusPrefix + id }
func VMUserDataKey(id string) string        { return VMUserDataPrefix + id }
func VMNameKey(project, name string) string { return VMNamePrefix + project + "/" + name }
func VMRequestKey(project, requestID string) string {
	return VMRequestPrefix + project + "/" + requestID
}
func VMEventsPrefix(id string) string { return VMEventPrefix + id + "/" }

// VMEventKey orders events by time; seq breaks ties within one write.
func VMEventKey(id string, unixNano int64, seq int) string {
	return fmt.Sprintf("%s%020d-%03d", VMEventsPrefix(id), unixNano, seq)
}
func ImageKey(name string) string                { return ImagePrefix + name }
func FlavorKey(name string) string               { return FlavorPrefix + name }
func NetworkKey(project, name string) string     { return NetworkPrefix + project + "/" + name }
func ServerGroupKey(project, name string) string { return ServerGroupPrefix + project + "/" + name }
func HostSpecKey(name string) string             { return HostSpecPrefix + name }
func HostAliveKey(name string) string            { return HostAlivePrefix + name }
func HostAllocKey(name string) string            { return HostAllocPrefix + name }
func ClaimsPrefix(host string) string            { return ClaimPrefix + host + "/" }
func ClaimKey(host, vmID string) string          { return ClaimsPrefix(host) + vmID }
func IPAMNetworkPrefix(networkID string) string  { return IPAMPrefix + networkID + "/" }
func IPAMKey(networkID, ip string) string        { return IPAMNetworkPrefix(networkID) + ip }
func SchedulerKey(replicaID string) string       { return SchedulerPrefix + replicaID }

// LastSegment returns what follows the last "/" of key (an id or a name).
func LastSegment(key string) string {
	return key[strings.LastIndexByte(key, '/')+1:]
}

// PrefixEnd is the end of the range that holds every key with prefix p.
func PrefixEnd(p string) string {
	b := []byte(p)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xff {
			b[i]++
			return string(b[:i+1])
		}
	}
	return "\x00"
}
