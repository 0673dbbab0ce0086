package server

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/api/ipam"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Limits of user input.
const (
	MaxUserDataBytes = 64 << 10
	maxNetworksPerVM = 8
	maxSSHKeys       = 32
	maxHostnameLen   = 253
	defaultProject   = "default"
	defaultNetwork   = "default"
	// defaultMTU fits a network into a 1500-byte underlay with VXLAN's 50
	// bytes of encapsulation: every network may span hosts.
	defaultMTU    = 1450
	maxDNSServers = 3
)

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// validateName checks that name is a DNS label; kind names the resource in
// the message ("vm", "flavor").
func validateName(kind, name string) error {
	if name == "" {
		return errdefs.Invalid("%s name is required", kind)
	}
	if !dnsLabel.MatchString(name) {
		return errdefs.Invalid("%s name %q is not a DNS label: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit", kind, name)
	}
	return nil
}

// projectOf returns the request's project, "default" when empty.
func projectOf(p string) (string, error) {
	if p == "" {
		return defaultProject, nil
	}
	if !dnsLabel.MatchString(p) {
		return "", errdefs.Invalid("project %q is not a DNS label: use 1-63 lowercase letters, digits and '-'", p)
	}
	return p, nil
}

// validateHostname accepts a DNS name: dot-separated DNS labels.
func validateHostname(field, h string) error {
	if len(h) > maxHostnameLen {
		return errdefs.Invalid("%s %q is longer than %d characters", field, h, maxHostnameLen)
	}
	for _, label := range strings.Split(h, ".") {
		if !dnsLabel.MatchString(label) {
			return errdefs.Invalid("%s %q is not a DNS name: use dot-separated labels of lowercase letters, digits and '-'", field, h)
		}
	}
	return nil
}

// nameOrIDRef checks a "name or id" reference to a VM.
func nameOrIDRef(ref string) error {
	if ref == "" {
		return errdefs.Invalid("vm name or id is required")
	}
	if len(ref) > 64 || strings.ContainsAny(ref, "/\x00") {
		return errdefs.Invalid("%q is neither a VM name nor a VM id", ref)
	}
	return nil
}

// validateVMCreate checks everything about a create that needs no store
// read, and returns the spec with defaults filled in. The request is not
// modified.
func validateVMCreate(req *minicloudv1.CreateVMRequest) (*minicloudv1.VMSpec, error) {
	if err := validateName("vm", req.GetName()); err != nil {
		return nil, err
	}
	in := req.GetSpec()
	if in == nil {
		return nil, errdefs.Invalid("spec is required: set at least spec.image and spec.flavor")
	}
	if in.GetImage() == "" {
		return nil, errdefs.Invalid("spec.image is required: choose one from `minicloud image list`")
	}
	if in.GetFlavor() == "" {
		return nil, errdefs.Invalid("spec.flavor is required: choose one from `minicloud flavor list`")
	}
	// An array, not a map literal: a map was built (and its buckets
	// allocated) on every create.
	for _, f := range [...]struct {
		field string
		set   bool
	}{
		{"spec.has_user_data", in.GetHasUserData()},
		{"spec.user_data_size", in.GetUserDataSize() != 0},
		{"spec.deletion_requested", in.GetDeletionRequested()},
		{"spec.deletion_time", in.GetDeletionTime() != nil},
		{"spec.resources", in.GetResources() != nil},
		{"spec.reboot_generation", in.GetRebootGeneration() != 0},
		{"spec.required_hypervisor", in.GetRequiredHypervisor() != ""},
		{"spec.lifecycle_version", in.GetLifecycleVersion() != 0},
		{"spec.port_forwards", len(in.GetPortForwards()) != 0},
	} {
		if f.set {
			return nil, errdefs.Invalid("%s is set by the server; leave it empty (user-data goes in the request's user_data, resources come from the flavor, the hypervisor from the image, port forwards with ExposeVMPort after create)", f.field)
		}
	}
	if n := len(req.GetUserData()); n > MaxUserDataBytes {
		return nil, errdefs.Invalid("user-data is %d bytes; the limit is %d (64 KiB): compress it (cloud-init accepts gzip) or fetch the rest from the network", n, MaxUserDataBytes)
	}
	if err := validateSSHKeys("spec.ssh_public_keys", in.GetSshPublicKeys()); err != nil {
		return nil, err
	}
	tags := normalizeTags(in.GetTags())
	if err := validateGuestMetadata(req.GetLabels(), tags, in.GetMetadata()); err != nil {
		return nil, err
	}
	spec := &minicloudv1.VMSpec{
		Image:                  in.GetImage(),
		Flavor:                 in.GetFlavor(),
		Networks:               in.GetNetworks(),
		SshPublicKeys:          in.GetSshPublicKeys(),
		ConfigDrive:            in.GetConfigDrive(),
		ConfigDriveFormat:      in.GetConfigDriveFormat(),
		AvailabilityZone:       in.GetAvailabilityZone(),
		ServerGroup:            in.GetServerGroup(),
		TargetHost:             in.GetTargetHost(),
		PowerState:             in.GetPowerState(),
		MetadataTokensRequired: in.GetMetadataTokensRequired(),
		Hostname:               in.GetHostname(),
		Tags:                   tags,
		Metadata:               in.GetMetadata(),
		OnHostFailure:          in.GetOnHostFailure(),
		RestartPolicy:          in.GetRestartPolicy(),
	}
	// The defaults are written out, so `vm show` and the agent read what
	// applies rather than UNSPECIFIED.
	if spec.OnHostFailure == minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_UNSPECIFIED {
		spec.OnHostFailure = minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_STOP
	} else if _, ok := minicloudv1.HostFailurePolicy_name[int32(spec.OnHostFailure)]; !ok {
		return nil, errdefs.Invalid("spec.on_host_failure %d is not a host failure policy: use STOP or EVACUATE", spec.OnHostFailure)
	}
	if spec.RestartPolicy == minicloudv1.RestartPolicy_RESTART_POLICY_UNSPECIFIED {
		spec.RestartPolicy = minicloudv1.RestartPolicy_RESTART_POLICY_ON_FAILURE
	} else if _, ok := minicloudv1.RestartPolicy_name[int32(spec.RestartPolicy)]; !ok {
		return nil, errdefs.Invalid("spec.restart_policy %d is not a restart policy: use ON_FAILURE or NEVER", spec.RestartPolicy)
	}
	if spec.PowerState == minicloudv1.PowerState_POWER_STATE_UNSPECIFIED {
		spec.PowerState = minicloudv1.PowerState_POWER_STATE_RUNNING
	} else if _, ok := minicloudv1.PowerState_name[int32(spec.PowerState)]; !ok {
		return nil, errdefs.Invalid("spec.power_state %d is not a power state: use RUNNING or STOPPED", spec.PowerState)
	}
	if len(spec.Networks) == 0 {
		spec.Networks = []string{defaultNetwork}
	}
	if len(spec.Networks) > maxNetworksPerVM {
		return nil, errdefs.Invalid("%d networks given; a VM has at most %d interfaces", len(spec.Networks), maxNetworksPerVM)
	}
	seen := map[string]bool{}
	for _, n := range spec.Networks {
		if err := validateName("network", n); err != nil {
			return nil, err
		}
		if seen[n] {
			return nil, errdefs.Invalid("network %s is listed twice; a VM has one interface per network", n)
		}
		seen[n] = true
	}
	if err := validateName("image", spec.Image); err != nil {
		return nil, err
	}
	if err := validateName("flavor", spec.Flavor); err != nil {
		return nil, err
	}
	if spec.ServerGroup != "" {
		if err := validateName("server group", spec.ServerGroup); err != nil {
			return nil, err
		}
	}
	if spec.AvailabilityZone != "" {
		if err := validateName("availability zone", spec.AvailabilityZone); err != nil {
			return nil, err
		}
	}
	if spec.TargetHost != "" {
		if err := validateHostname("spec.target_host", spec.TargetHost); err != nil {
			return nil, err
		}
	}
	switch spec.ConfigDriveFormat {
	case "":
		spec.ConfigDriveFormat = "config-2"
	case "config-2", "cidata":
	default:
		return nil, errdefs.Invalid("spec.config_drive_format %q is not supported: use \"config-2\" (OpenStack) or \"cidata\" (NoCloud)", spec.ConfigDriveFormat)
	}
	if spec.Hostname == "" {
		spec.Hostname = req.GetName()
	} else if err := validateHostname("spec.hostname", spec.Hostname); err != nil {
		return nil, err
	}
	spec.HasUserData = len(req.GetUserData()) > 0
	spec.UserDataSize = int64(len(req.GetUserData()))
	if id := req.GetRequestId(); len(id) > 128 || strings.ContainsAny(id, "/\x00") {
		return nil, errdefs.Invalid("request_id must be at most 128 characters without '/' (a UUID is a good choice)")
	}
	// Every field is bounded above; this backstop bounds the record
	// etcd stores, whatever field a later change forgets.
	if n := proto.Size(spec); n > MaxVMSpecBytes {
		return nil, errdefs.Invalid("the VM's spec is %d bytes; a VM holds at most %d (metadata, keys and labels together)", n, MaxVMSpecBytes)
	}
	return spec, nil
}

// MaxVMSpecBytes bounds a VM's stored spec: above the sum of the largest
// legal fields (512 KiB of metadata, 32 keys of 8 KiB, 64 labels, tags).
const MaxVMSpecBytes = 1 << 20

// validateHost checks an agent's registration and fills in defaults.
func validateHost(h *minicloudv1.Host) error {
	if h == nil {
		return errdefs.Invalid("host is required")
	}
	name := h.GetMeta().GetName()
	if name == "" {
		return errdefs.Invalid("host.meta.name is required")
	}
	if err := validateHostname("host name", name); err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(h.GetAddress())
	if err != nil || host == "" {
		return errdefs.Invalid("host address %q must be host:port of the agent's AgentService (e.g. 192.0.2.10:8642)", h.GetAddress())
	}
	if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
		return errdefs.Invalid("host address %q has no valid port", h.GetAddress())
	}
	c := h.GetCapacity()
	if c.GetVcpus() <= 0 || c.GetMemoryMib() <= 0 || c.GetDiskGib() < 0 {
		return errdefs.Invalid("host capacity must have vcpus > 0 and memory_mib > 0 (got %d vCPUs, %d MiB, %d GiB)", c.GetVcpus(), c.GetMemoryMib(), c.GetDiskGib())
	}
	if t := h.GetTunnelIp(); t != "" {
		a, err := netip.ParseAddr(t)
		if err != nil || !a.Is4() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
			return errdefs.Invalid("host tunnel_ip %q is not a usable IPv4 unicast address (the host's underlay address for VXLAN)", t)
		}
	}
	if len(h.GetHypervisors()) == 0 {
		return errdefs.Invalid("host hypervisors must list what the host runs: \"kvm\" and/or \"tcg\"")
	}
	for _, hv := range h.GetHypervisors() {
		if hv != "kvm" && hv != "tcg" {
			return errdefs.Invalid("hypervisor %q is not supported: use \"kvm\" or \"tcg\"", hv)
		}
	}
	if f := h.GetFenceAfterSeconds(); f < 0 || f >= int64(HostLeaseTTL/time.Second) {
		return errdefs.Invalid("host fence_after_seconds %d must be 0 (never self-fence) or shorter than the %s lease, so the host has destroyed its VMs before the control plane counts it fenced", f, HostLeaseTTL)
	}
	r := h.GetAllocationRatios()
	if r.GetCpu() < 0 || r.GetRam() < 0 || r.GetDisk() < 0 {
		return errdefs.Invalid("allocation ratios must be positive (0 means the default)")
	}
	if h.GetAvailabilityZone() != "" {
		if err := validateName("availability zone", h.GetAvailabilityZone()); err != nil {
			return err
		}
	}
	return nil
}

// networkPlan is a validated network: its prefix, gateway and MTU.
type networkPlan struct {
	prefix  netip.Prefix
	gateway netip.Addr
	mtu     int32
	dns     []string
}

// validateNetwork checks a CreateNetworkRequest's addressing.
// reservedRanges can never be a guest network: every host routes them
// itself (loopback, the metadata service's link-local 169.254.169.254),
// or they are not unicast.
var reservedRanges = []struct {
	prefix netip.Prefix
	what   string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "\"this network\""},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local, where the metadata service answers"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved and broadcast"},
}

func validateNetwork(req *minicloudv1.CreateNetworkRequest) (networkPlan, error) {
	var p networkPlan
	if req.GetCidr() == "" {
		return p, errdefs.Invalid("cidr is required, e.g. 10.88.0.0/24")
	}
	prefix, err := netip.ParsePrefix(req.GetCidr())
	if err != nil || !prefix.Addr().Is4() {
		return p, errdefs.Invalid("cidr %q is not an IPv4 prefix like 10.88.0.0/24", req.GetCidr())
	}
	if prefix.Masked() != prefix {
		return p, errdefs.Invalid("cidr %s has host bits set; did you mean %s?", prefix, prefix.Masked())
	}
	if prefix.Bits() < 8 || prefix.Bits() > 29 {
		return p, errdefs.Invalid("cidr %s: the prefix length must be between /8 and /29", prefix)
	}
	for _, r := range reservedRanges {
		if r.prefix.Overlaps(prefix) {
			return p, errdefs.Invalid("cidr %s overlaps %s (%s): choose a private range such as 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16", prefix, r.prefix, r.what)
		}
	}
	p.prefix = prefix
	p.gateway = prefix.Addr().Next()
	if req.GetGateway() != "" {
		gw, err := netip.ParseAddr(req.GetGateway())
		if err != nil || !gw.Is4() {
			return p, errdefs.Invalid("gateway %q is not an IPv4 address", req.GetGateway())
		}
		if !prefix.Contains(gw) || gw == prefix.Addr() || gw == ipam.Broadcast(prefix) {
			return p, errdefs.Invalid("gateway %s must be a host address inside %s", gw, prefix)
		}
		p.gateway = gw
	}
	p.mtu = req.GetMtu()
	if p.mtu == 0 {
		p.mtu = defaultMTU
	}
	if p.mtu < 576 || p.mtu > 9000 {
		return p, errdefs.Invalid("mtu %d is out of range: use 576-9000 (0 means %d)", p.mtu, defaultMTU)
	}
	if len(req.GetDnsServers()) > maxDNSServers {
		return p, errdefs.Invalid("%d dns_servers: at most %d (DHCP clients use no more)", len(req.GetDnsServers()), maxDNSServers)
	}
	for _, d := range req.GetDnsServers() {
		a, err := netip.ParseAddr(d)
		if err != nil || !a.Is4() || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
			return p, errdefs.Invalid("dns server %q is not a usable IPv4 address", d)
		}
		p.dns = append(p.dns, a.String())
	}
	return p, nil
}

func validateFlavor(req *minicloudv1.CreateFlavorRequest) error {
	if err := validateName("flavor", req.GetName()); err != nil {
		return err
	}
	switch {
	case req.GetVcpus() < 1 || req.GetVcpus() > 256:
		return errdefs.Invalid("vcpus %d is out of range: use 1-256", req.GetVcpus())
	case req.GetMemoryMib() < 64 || req.GetMemoryMib() > 4<<20:
		return errdefs.Invalid("memory_mib %d is out of range: use 64 MiB to 4 TiB", req.GetMemoryMib())
	case req.GetDiskGib() < 1 || req.GetDiskGib() > 64<<10:
		return errdefs.Invalid("disk_gib %d is out of range: use 1 GiB to 64 TiB", req.GetDiskGib())
	}
	return nil
}

func validateServerGroup(req *minicloudv1.CreateServerGroupRequest) error {
	if err := validateName("server group", req.GetName()); err != nil {
		return err
	}
	if _, ok := minicloudv1.ServerGroupPolicy_name[int32(req.GetPolicy())]; !ok || req.GetPolicy() == minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_UNSPECIFIED {
		return errdefs.Invalid("policy is required: use affinity, anti-affinity, soft-affinity or soft-anti-affinity")
	}
	return nil
}

// checkResourceVersion compares a request's optional resource version with
// the object's.
func checkResourceVersion(kind, name string, want, have int64) error {
	if want < 0 {
		// Never a version: a malformed request, not a lost race (found
		// by TestFuzzEveryRPC, which got ABORTED "changed" for it).
		return errdefs.Invalid("resource_version %d is negative: leave it 0, or send the one `%s show %s` prints", want, kind, name)
	}
	if want != 0 && want != have {
		return errdefs.Conflict("%s %s changed: request has resource_version %d, current is %d; read it again and retry", kind, name, want, have)
	}
	return nil
}

func describeNetwork(n *minicloudv1.Network) string {
	return fmt.Sprintf("%s (project %s, %s)", n.GetMeta().GetName(), n.GetMeta().GetProject(), n.GetCidr())
}
