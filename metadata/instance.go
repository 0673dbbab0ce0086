// Package metadata is minicloud's instance metadata service: what a guest may
// learn about itself, served over HTTP at 169.254.169.254 in the EC2,
// OpenStack and GCE dialects, and rendered onto config drives.
//
// A guest is identified by where its packets come from (the bridge they
// arrived on and their source address, cross-checked with the source MAC in
// the host's neighbour table), never by anything it says. Answers come from an
// in-memory Directory that the agent keeps in step with its assignments, so a
// request never waits on etcd.
package metadata

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"golang.org/x/crypto/ssh"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/nic"
)

// DefaultDomain is the DNS domain guests are told they live in when nothing
// else is configured.
const DefaultDomain = "minicloud.internal"

// DefaultAvailabilityZone is used when a VM names none.
const DefaultAvailabilityZone = "default"

// Instance is everything a guest may learn about itself. It is immutable once
// handed to a Directory: build a new one to change anything.
type Instance struct {
	// ID is the VM's UUID; it is the instance-id in every dialect.
	ID       string
	Name     string
	Hostname string
	Domain   string
	Project  string
	// AvailabilityZone and Region (the zone up to its last "-", as AWS and
	// GCE spell them).
	AvailabilityZone string
	Region           string
	// InstanceType is the flavor name.
	InstanceType string
	// Image is the image name (served as ami-id).
	Image       string
	LaunchIndex int
	LaunchTime  time.Time
	// Interfaces in guest order; the first is the primary one.
	Interfaces []Interface
	SSHKeys    []SSHKey
	// UserData is served verbatim; nil means none (404 where clouds 404).
	UserData []byte
	// VendorData is cloud-config text from the operator, if any.
	VendorData []byte
	// Labels are key/value labels, served as EC2 instance tags
	// (meta-data/tags/instance/).
	Labels map[string]string
	// Tags are GCE-style network tags (instance/tags).
	Tags []string
	// Attributes are the custom metadata: GCE instance/attributes/ and
	// OpenStack meta.
	Attributes map[string]string
	// TokensRequired refuses IMDSv1 (token-less) EC2 requests with 401.
	TokensRequired bool
}

// Interface is one NIC of an instance as the host wired it; its bridge and
// address together identify the guest.
type Interface = nic.NIC

// SSHKey is one authorized key with the name clouds list it under.
type SSHKey struct {
	Name string
	Key  string
}

// InstanceFromVM builds the metadata of a VM from the API object and its
// user-data, as the agent receives both from HostService.WatchAssignments.
// The VM must carry an id and at least well-formed addresses; a VM without
// addresses yet yields an Instance no packet can be matched to.
func InstanceFromVM(vm *minicloudv1.VM, userData []byte) (*Instance, error) {
	meta, spec := vm.GetMeta(), vm.GetSpec()
	if _, err := uuid.Parse(meta.GetId()); err != nil {
		return nil, fmt.Errorf("vm %q: id %q is not a UUID: %w", meta.GetName(), meta.GetId(), err)
	}
	inst := &Instance{
		ID:               meta.GetId(),
		Name:             meta.GetName(),
		Hostname:         spec.GetHostname(),
		Domain:           DefaultDomain,
		Project:          meta.GetProject(),
		AvailabilityZone: spec.GetAvailabilityZone(),
		InstanceType:     spec.GetFlavor(),
		Image:            spec.GetImage(),
		TokensRequired:   spec.GetMetadataTokensRequired(),
		Labels:           meta.GetLabels(),
		Tags:             spec.GetTags(),
		Attributes:       spec.GetMetadata(),
	}
	if inst.Hostname == "" {
		inst.Hostname = inst.Name
	}
	if inst.Project == "" {
		inst.Project = "default"
	}
	if inst.AvailabilityZone == "" {
		inst.AvailabilityZone = DefaultAvailabilityZone
	}
	inst.Region = regionOf(inst.AvailabilityZone)
	if ct := meta.GetCreateTime(); ct != nil {
		inst.LaunchTime = ct.AsTime().UTC()
	}
	if len(userData) > 0 {
		inst.UserData = append([]byte(nil), userData...)
	}
	nics, err := nic.FromVM(vm)
	if err != nil {
		return nil, err
	}
	inst.Interfaces = nics
	for i, k := range spec.GetSshPublicKeys() {
		key, err := parseSSHKey(i, k)
		if err != nil {
			return nil, fmt.Errorf("vm %s: ssh key %d: %w", inst.ID, i, err)
		}
		inst.SSHKeys = append(inst.SSHKeys, key)
	}
	return inst, nil
}

// parseSSHKey names a key after its comment when that is a plain word, as
// EC2 key pair names are, and after its position otherwise.
func parseSSHKey(i int, line string) (SSHKey, error) {
	_, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return SSHKey{}, err
	}
	name := fmt.Sprintf("key-%d", i)
	if c := strings.TrimSpace(comment); c != "" && isPlainName(c) {
		name = c
	}
	return SSHKey{Name: name, Key: strings.TrimSpace(line)}, nil
}

func isPlainName(s string) bool {
	if len(s) > 64 {
		return false
	}
	for _, r := range s {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.@", r)
		if !ok {
			return false
		}
	}
	return true
}

func regionOf(zone string) string {
	if i := strings.LastIndexByte(zone, '-'); i > 0 {
		return zone[:i]
	}
	return zone
}

// Validate checks what the Directory and the renderers rely on.
func (i *Instance) Validate() error {
	if i == nil {
		return fmt.Errorf("nil instance")
	}
	if _, err := uuid.Parse(i.ID); err != nil {
		return fmt.Errorf("instance id %q is not a UUID", i.ID)
	}
	for n, nic := range i.Interfaces {
		if !nic.Address.IsValid() {
			return fmt.Errorf("instance %s: interface %d has no address", i.ID, n)
		}
		if len(nic.MAC) != 6 {
			return fmt.Errorf("instance %s: interface %d has no Ethernet MAC", i.ID, n)
		}
	}
	return nil
}

// Primary returns the first interface, or the zero Interface.
func (i *Instance) Primary() Interface {
	if len(i.Interfaces) == 0 {
		return Interface{}
	}
	return i.Interfaces[0]
}

// FQDN is hostname.domain (just the hostname without a domain).
func (i *Instance) FQDN() string {
	if i.Domain == "" {
		return i.Hostname
	}
	return i.Hostname + "." + i.Domain
}

// Fingerprint is a digest of every field: equal fingerprints mean a guest
// would read exactly the same metadata. It is the basis of ETags and of the
// Directory's change notifications.
func (i *Instance) Fingerprint() string {
	type nic struct {
		Bridge, Network, MAC, Address, Gateway string
		MTU                                    int
	}
	v := struct {
		*Instance
		Interfaces []nic
		Labels     [][2]string
	}{Instance: i}
	for _, n := range i.Interfaces {
		v.Interfaces = append(v.Interfaces, nic{n.Bridge, n.Network, n.MAC.String(), n.Address.String(), n.Gateway.String(), n.MTU})
	}
	for _, k := range slices.Sorted(maps.Keys(i.Labels)) {
		v.Labels = append(v.Labels, [2]string{k, i.Labels[k]})
	}
	b, err := json.Marshal(v)
	if err != nil {
		// Every field is plainly encodable; this cannot happen.
		panic(fmt.Sprintf("metadata: fingerprint: %v", err))
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}
