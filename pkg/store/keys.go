// Package store is minicloud's etcd layout and its write protocols: the
// keys every component agrees on (Layout, below; docs/architecture.md shows
// the same table and TestKeyTableInDocs keeps it so), the codec (values are
// protobuf, binary wire format; Decode, Marshal), and one function per
// write protocol, each building one etcd transaction (vm_write.go,
// placement.go, claims.go).
//
// Spec and status are separate keys so that users and hosts never write the
// same key; the user-data has its own key so lists never carry it.
package store

import (
	"fmt"
	"strconv"
	"strings"
)

// KeySpec is one row of the key layout.
type KeySpec struct {
	// Pattern is the key under Prefix, with <placeholders>.
	Pattern string
	// Prefix is the constant every key of the row starts with.
	Prefix string
	// Value is what the key holds; WrittenBy who writes it.
	Value, WrittenBy string
}

// Layout is every key minicloud stores, under Prefix.
var Layout = []KeySpec{
	{"vms/spec/<id>", VMSpecPrefix, "VM (meta + spec)", "API"},
	{"vms/status/<id>", VMStatusPrefix, "VMStatus", "API at create and delete, scheduler, agent via the API"},
	{"vms/userdata/<id>", VMUserDataPrefix, "raw user-data", "API, at create"},
	{"vms/names/<project>/<name>", VMNamePrefix, "VM id (uniqueness index)", "API"},
	{"vms/requests/<project>/<request-id>", VMRequestPrefix, "VM id, leased 24 h (idempotent create)", "API"},
	{"vms/events/<id>/<seq>", VMEventPrefix, "Event (seq zero-padded to 20 digits; the last 256 are kept)", "API, scheduler, agent via the API"},
	{"vms/eventseq/<id>", VMEventSeqPrefix, "events ever appended to the VM's log (the next seq); compared by every append", "with every event"},
	{"images/<name>", ImagePrefix, "Image (blobs in the image store shared by the API replicas, by sha256)", "API"},
	{"imagestore/lock/<lease-hex>", ImageStoreLockPrefix, "etcd mutex over the image store (commit, delete, garbage collection)", "API replicas"},
	{"imagestore/uploads/.upload-<hex>", ImageUploadPrefix, "replica holding that upload (its temporary file's name) in progress, attached to the replica's lease", "API replica"},
	{"flavors/<name>", FlavorPrefix, "Flavor", "API"},
	{"networks/<project>/<name>", NetworkPrefix, "Network", "API"},
	{"servergroups/<project>/<name>", ServerGroupPrefix, "ServerGroup", "API"},
	{"hosts/spec/<name>", HostSpecPrefix, "Host (registration, disabled flag)", "API"},
	{"hosts/alive/<name>", HostAlivePrefix, "lease id, attached to the host's heartbeat lease", "API on heartbeat"},
	{"hosts/down/<name>", HostDownPrefix, "Timestamp: when the host was first seen without its lease (UNREACHABLE); removed when it is back", "scheduler"},
	{"hosts/fenced/<name>", HostFencedPrefix, "HostFence: the host runs none of its VMs (FENCED); removed when it is back", "API (FenceHost), scheduler (self-fencing deadline)"},
	{"hosts/released/<host>/<vm id>", ReleasedPrefix, "assignment epoch of a VM that left the fenced host (evacuated, force-deleted): the host destroys it and confirms", "API, scheduler; removed on the host's confirmation"},
	{"hosts/alloc/<name>", HostAllocPrefix, "HostAllocation (sum of claims; its revision is compared by claims)", "scheduler, API on release"},
	{"claims/<host>/<vm id>", ClaimPrefix, "Claim", "scheduler, API on release"},
	{"ipam/<network id>/<ip>", IPAMPrefix, "VM id", "API"},
	{"portforwards/<protocol>/<host-port>", PortForwardPrefix, "VM id: the VM that forwards this host port (its claim, cluster-wide; the forward itself is in the VM's spec)", "API (ExposeVMPort, UnexposeVMPort, VM removal)"},
	{"vnis/<vni>", VNIPrefix, "network id (VNI zero-padded to 8 digits: the network's VXLAN segment id, taken in its create transaction, freed in its delete's)", "API"},
	{"schedulers/<replica id>", SchedulerPrefix, "replica id, attached to the replica's lease (work sharing)", "each scheduler replica"},
	{"quotas/usage/<project>", QuotaUsagePrefix, "QuotaUsage (what the project holds; every create and removal of a VM, network, server group or image changes it in its own transaction)", "API"},
	{"quotas/limits/<project>", QuotaLimitsPrefix, "QuotaLimits (the project's overrides of the default limits)", "API (SetQuota)"},
	{"pki/ca", CAKey, "ClusterCA (certificate + key)", "first API server (create-if-absent)"},
	{"pki/jointokens/<id>", JoinTokenPrefix, "JoinToken (hashed secret), leased until expiry", "API"},
	{"pki/hostcerts/<host>/<serial>", HostCertPrefix, "IssuedCert", "API on join"},
	{"pki/revoked/<serial>", RevokedPrefix, "IssuedCert (deny-list), leased until the cert expires", "API on revoke / re-join"},
	{"auth/projects/<name>", ProjectPrefix, "Project", "API (admin)"},
	{"auth/users/<name>", UserPrefix, "User (name and role bindings)", "API (admin)"},
	{"audit/<unix-nanos>-<rand>", AuditPrefix, "AuditRecord, leased for the retention (30 days)", "API, on every mutating call"},
	{"auth/tokens/<user>/<id>", TokenPrefix, "Token (SHA-256 of the secret, never the secret), leased until expiry", "API"},
	{"identity/keys/<kid>", IdentityKeyPrefix, "IdentityKey (workload identity signing key), leased until the last token it signed expired", "API (create-if-unchanged on rotation)"},
}

// MarkdownKeyTable renders Layout as the table docs/architecture.md carries
// between its "key table" markers.
func MarkdownKeyTable() string {
	var b strings.Builder
	b.WriteString("| key | value | written by |\n|---|---|---|\n")
	for _, k := range Layout {
		fmt.Fprintf(&b, "| `%s` | %s | %s |\n", k.Pattern, k.Value, k.WrittenBy)
	}
	return b.String()
}

// Prefix is the root of every minicloud key.
const Prefix = "/minicloud/"

const (
	VMSpecPrefix      = Prefix + "vms/spec/"
	VMStatusPrefix    = Prefix + "vms/status/"
	VMUserDataPrefix  = Prefix + "vms/userdata/"
	VMNamePrefix      = Prefix + "vms/names/"
	VMRequestPrefix   = Prefix + "vms/requests/"
	VMEventPrefix     = Prefix + "vms/events/"
	VMEventSeqPrefix  = Prefix + "vms/eventseq/"
	ImagePrefix       = Prefix + "images/"
	FlavorPrefix      = Prefix + "flavors/"
	NetworkPrefix     = Prefix + "networks/"
	ServerGroupPrefix = Prefix + "servergroups/"
	HostPrefix        = Prefix + "hosts/" // every key of every host
	HostSpecPrefix    = Prefix + "hosts/spec/"
	HostAlivePrefix   = Prefix + "hosts/alive/"
	HostAllocPrefix   = Prefix + "hosts/alloc/"
	HostDownPrefix    = Prefix + "hosts/down/"
	HostFencedPrefix  = Prefix + "hosts/fenced/"
	ReleasedPrefix    = Prefix + "hosts/released/"
	ClaimPrefix       = Prefix + "claims/"
	IPAMPrefix        = Prefix + "ipam/"
	VNIPrefix         = Prefix + "vnis/"
	PortForwardPrefix = Prefix + "portforwards/"
	SchedulerPrefix   = Prefix + "schedulers/"
	QuotaUsagePrefix  = Prefix + "quotas/usage/"
	QuotaLimitsPrefix = Prefix + "quotas/limits/"
	CAKey             = Prefix + "pki/ca"
	JoinTokenPrefix   = Prefix + "pki/jointokens/"
	HostCertPrefix    = Prefix + "pki/hostcerts/"
	RevokedPrefix     = Prefix + "pki/revoked/"
	ProjectPrefix     = Prefix + "auth/projects/"
	UserPrefix        = Prefix + "auth/users/"
	TokenPrefix       = Prefix + "auth/tokens/"
	AuditPrefix       = Prefix + "audit/"
	IdentityKeyPrefix = Prefix + "identity/keys/"
	// ImageStoreLockPrefix is the etcd mutex every API replica takes
	// before committing, deleting or collecting blobs of the shared store.
	ImageStoreLockPrefix = Prefix + "imagestore/lock/"
	// ImageUploadPrefix holds one leased key per upload in progress, so no
	// replica's garbage collection removes another's temporary file.
	ImageUploadPrefix = Prefix + "imagestore/uploads/"
)

func VMSpecKey(id string) string            { return VMSpecPrefix + id }
func VMStatusKey(id string) string          { return VMStatusPrefix + id }
func VMUserDataKey(id string) string        { return VMUserDataPrefix + id }
func VMNameKey(project, name string) string { return VMNamePrefix + project + "/" + name }
func VMRequestKey(project, requestID string) string {
	return VMRequestPrefix + project + "/" + requestID
}
func VMEventsPrefix(id string) string { return VMEventPrefix + id + "/" }
func VMEventSeqKey(id string) string  { return VMEventSeqPrefix + id }

// VMEventKey is the seq-th event of a VM's log; zero-padded so keys sort
// in append order.
func VMEventKey(id string, seq int64) string {
	// One allocation: fmt.Sprintf boxed seq and built the prefix apart,
	// for every event written.
	var digits [20]byte
	d := strconv.AppendInt(digits[:0], seq, 10)
	var b strings.Builder
	b.Grow(len(VMEventPrefix) + len(id) + 1 + max(20, len(d)))
	b.WriteString(VMEventPrefix)
	b.WriteString(id)
	b.WriteByte('/')
	for range 20 - len(d) {
		b.WriteByte('0')
	}
	b.Write(d)
	return b.String()
}
func ImageKey(name string) string                { return ImagePrefix + name }
func ImageUploadKey(tempName string) string      { return ImageUploadPrefix + tempName }
func FlavorKey(name string) string               { return FlavorPrefix + name }
func NetworkKey(project, name string) string     { return NetworkPrefix + project + "/" + name }
func ServerGroupKey(project, name string) string { return ServerGroupPrefix + project + "/" + name }
func HostSpecKey(name string) string             { return HostSpecPrefix + name }
func HostAliveKey(name string) string            { return HostAlivePrefix + name }
func HostAllocKey(name string) string            { return HostAllocPrefix + name }
func HostDownKey(name string) string             { return HostDownPrefix + name }
func HostFencedKey(name string) string           { return HostFencedPrefix + name }
func HostReleasedPrefix(host string) string      { return ReleasedPrefix + host + "/" }
func HostReleasedKey(host, vmID string) string   { return HostReleasedPrefix(host) + vmID }
func ClaimsPrefix(host string) string            { return ClaimPrefix + host + "/" }
func ClaimKey(host, vmID string) string          { return ClaimsPrefix(host) + vmID }

// ParseClaimKey splits claims/<host>/<vm id>.
func ParseClaimKey(key string) (host, vmID string, ok bool) {
	rest, ok := strings.CutPrefix(key, ClaimPrefix)
	if !ok {
		return "", "", false
	}
	return strings.Cut(rest, "/")
}
func IPAMNetworkPrefix(networkID string) string { return IPAMPrefix + networkID + "/" }
func IPAMKey(networkID, ip string) string       { return IPAMNetworkPrefix(networkID) + ip }
func SchedulerKey(replicaID string) string      { return SchedulerPrefix + replicaID }
func QuotaUsageKey(project string) string       { return QuotaUsagePrefix + project }
func QuotaLimitsKey(project string) string      { return QuotaLimitsPrefix + project }
func JoinTokenKey(id string) string             { return JoinTokenPrefix + id }
func HostCertsPrefix(host string) string        { return HostCertPrefix + host + "/" }
func HostCertKey(host, serial string) string    { return HostCertsPrefix(host) + serial }
func RevokedKey(serial string) string           { return RevokedPrefix + serial }
func ProjectKey(name string) string             { return ProjectPrefix + name }
func UserKey(name string) string                { return UserPrefix + name }
func UserTokensPrefix(user string) string       { return TokenPrefix + user + "/" }
func TokenKey(user, id string) string           { return UserTokensPrefix(user) + id }
func IdentityKeyKey(kid string) string          { return IdentityKeyPrefix + kid }

// VNIKey holds the id of the network that owns vni; zero-padded so keys
// sort numerically.
func VNIKey(vni uint32) string { return fmt.Sprintf("%s%08d", VNIPrefix, vni) }

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
