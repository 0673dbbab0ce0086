// Package lab runs a whole minicloud cluster on one machine, built as it
// would be on real machines: N hypervisor hosts, each a network namespace
// and a mount namespace with its own libvirtd, virtlogd and `minicloudd
// agent`, joined by an underlay bridge; a 3-member etcd cluster with TLS;
// two API replicas and two schedulers. `make lab` (hack/lab) and the lab
// tests (lab/e2e) both drive it through this package, so what the tests
// exercise is exactly what a person gets. docs/lab.md describes it.
//
// Every step measures before it acts, so Up on a running lab changes
// nothing and Up after a crash finishes the job; Down removes every
// namespace, link, process and directory the lab made, and nothing else.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Defaults of `make lab`.
const (
	DefaultName   = "mclab"
	DefaultDir    = "/var/lib/minicloud-lab"
	DefaultHosts  = 3
	DefaultSubnet = "10.250.0.0/24"
)

// Well-known ports, the same on every host and control node as on real
// machines (each has its own address on the underlay).
const (
	etcdClientPort   = 2379
	etcdPeerPort     = 2380
	apiPort          = 8640
	apiMetricsPort   = 8641
	agentPort        = 8642
	agentMetricsPort = 8643
	apiWebPort       = 8644
	schedMetricsPort = 8645
)

// Sizes of the control plane.
const (
	etcdMembers   = 3
	apiReplicas   = 2
	schedReplicas = 2
)

// Config describes one lab. It is saved in Dir/lab.json by Up, so every
// later command (stop, partition, down, ...) needs only Dir.
type Config struct {
	// Name prefixes the lab's namespaces and interfaces (at most 6
	// characters: interface names have 15). Two labs on one machine need
	// different names, directories and subnets.
	Name string `json:"name"`
	// Dir holds all of the lab's state: certificates, etcd and API data,
	// each host's private /run, /etc/libvirt, /var/lib/libvirt and agent
	// data, logs and pid files.
	Dir string `json:"dir"`
	// Hosts is the number of hypervisor hosts.
	Hosts int `json:"hosts"`
	// Subnet is the underlay: .1 is the machine itself (the lab's router),
	// .2-.4 the control nodes, .11 onwards the hosts.
	Subnet netip.Prefix `json:"subnet"`
	// BinDir holds the minicloud and minicloudd binaries the lab runs.
	BinDir string `json:"bin_dir"`
	// Images are imported by name from directories as built by
	// hack/images (disk.qcow2, and vmlinuz, initrd.img, cmdline for
	// direct boot), as `make up` and `make images` do. "tiny" is
	// required: it boots the VM on every host.
	Images map[string]string `json:"images"`
	// NoVMs skips booting one VM per host (Up still imports images and
	// creates flavors and the default network).
	NoVMs bool `json:"no_vms"`
	// Capacity, if set, is what every host offers instead of the
	// default HostCapacity table (a benchmark that packs 30 VMs onto one
	// host needs more than the defaults).
	Capacity *Capacity `json:"capacity,omitempty"`
}

// Lab is a lab on this machine, described by its Config.
type Lab struct {
	Config
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

func (c *Config) validate() error {
	if c.Name == "" || len(c.Name) > 6 || strings.ContainsAny(c.Name, "/ .") {
		return fmt.Errorf("lab name %q: want 1-6 characters (it prefixes interface names)", c.Name)
	}
	if !filepath.IsAbs(c.Dir) || filepath.Clean(c.Dir) == "/" {
		return fmt.Errorf("lab directory %q: want an absolute path below /", c.Dir)
	}
	if c.Hosts < 1 || c.Hosts > 200 {
		return fmt.Errorf("lab hosts %d: want 1-200", c.Hosts)
	}
	if !c.Subnet.Addr().Is4() || c.Subnet.Bits() > 24 {
		return fmt.Errorf("lab subnet %s: want an IPv4 /24 or larger", c.Subnet)
	}
	return nil
}

// New returns the lab described by cfg, with defaults filled in.
func New(cfg Config, log io.Writer) (*Lab, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if cfg.Dir == "" {
		cfg.Dir = DefaultDir
	}
	if cfg.Hosts == 0 {
		cfg.Hosts = DefaultHosts
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix(DefaultSubnet)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Lab{Config: cfg, Log: log}, nil
}

// Load reads the lab saved in dir by Up.
func Load(dir string, log io.Writer) (*Lab, error) {
	b, err := os.ReadFile(filepath.Join(dir, "lab.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no lab in %s (make lab creates one): %w", dir, err)
	}
	if err != nil {
		return nil, fmt.Errorf("read lab: %w", err)
	}
	var cfg Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("lab %s/lab.json: %w", dir, err)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Lab{Config: cfg, Log: log}, nil
}

func (l *Lab) save() error {
	if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return fmt.Errorf("lab directory: %w", err)
	}
	// QEMU's unprivileged user must traverse to the VM disks below.
	if err := os.Chmod(l.Dir, 0o755); err != nil {
		return fmt.Errorf("lab directory: %w", err)
	}
	b, err := json.MarshalIndent(l.Config, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(l.Dir, "lab.json"), append(b, '\n'), 0o644)
}

func (l *Lab) logf(format string, args ...any) {
	if l.Log != nil {
		fmt.Fprintf(l.Log, "lab: "+format+"\n", args...)
	}
}

// nthAddr is the n-th address of the underlay subnet.
func (l *Lab) nthAddr(n int) netip.Addr {
	a := l.Subnet.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// RouterAddr is the machine's own address on the underlay.
func (l *Lab) RouterAddr() netip.Addr { return l.nthAddr(1) }

// ControlAddr is the address of control node i (1-3): it runs etcd member
// i, and API replica and scheduler i where there is one.
func (l *Lab) ControlAddr(i int) netip.Addr { return l.nthAddr(1 + i) }

// HostNames are the lab's hypervisor hosts, host1..hostN: also their
// names in the cloud.
func (l *Lab) HostNames() []string {
	out := make([]string, l.Hosts)
	for i := range out {
		out[i] = fmt.Sprintf("host%d", i+1)
	}
	return out
}

// hostIndex is 1 for host1; 0 for a name that is not one of the lab's hosts.
func (l *Lab) hostIndex(name string) int {
	for i, h := range l.HostNames() {
		if h == name {
			return i + 1
		}
	}
	return 0
}

func (l *Lab) checkHost(name string) error {
	if l.hostIndex(name) == 0 {
		return fmt.Errorf("no host %q in this lab (hosts: %s)", name, strings.Join(l.HostNames(), ", "))
	}
	return nil
}

// HostAddr is host's underlay address (its agent listens there).
func (l *Lab) HostAddr(host string) netip.Addr { return l.nthAddr(10 + l.hostIndex(host)) }

// Capacity is what a host offers to the scheduler (the agent's --vcpus,
// --memory and --disk). Hosts differ, so a test can tell that each
// reports its own and not the machine's.
type Capacity struct {
	VCPUs     int   `json:"vcpus"`
	MemoryMiB int64 `json:"memory_mib"`
	DiskGiB   int64 `json:"disk_gib"`
}

// HostCapacity is the capacity host registers.
func (l *Lab) HostCapacity(host string) Capacity {
	if l.Capacity != nil {
		return *l.Capacity
	}
	i := l.hostIndex(host)
	return Capacity{VCPUs: 2 + i, MemoryMiB: 2048 + 1024*int64(i), DiskGiB: 10 + 5*int64(i)}
}

// APIEndpoints are the API replicas' gRPC addresses.
func (l *Lab) APIEndpoints() []string {
	var out []string
	for i := 1; i <= apiReplicas; i++ {
		out = append(out, netip.AddrPortFrom(l.ControlAddr(i), apiPort).String())
	}
	return out
}

// ClientEndpoint is what the CLI, the lab's own client and the agents are
// given: every API replica, comma-separated; gRPC fails over between them
// (pkg/client).
func (l *Lab) ClientEndpoint() string { return strings.Join(l.APIEndpoints(), ",") }

// ImageDir is the image blob store the API replicas share.
func (l *Lab) ImageDir() string { return filepath.Join(l.Dir, "images") }

// CLIConfig is the minicloud config file that points the CLI at the lab
// (export MINICLOUD_CONFIG=...).
func (l *Lab) CLIConfig() string { return filepath.Join(l.Dir, "config.yaml") }

// Path helpers.
func (l *Lab) pkiDir() string               { return filepath.Join(l.Dir, "pki") }
func (l *Lab) logDir() string               { return filepath.Join(l.Dir, "logs") }
func (l *Lab) hostDir(host string) string   { return filepath.Join(l.Dir, "hosts", host) }
func (l *Lab) bin(name string) string       { return filepath.Join(l.BinDir, name) }
func (l *Lab) LogFile(proc string) string   { return filepath.Join(l.logDir(), proc+".log") }
func (l *Lab) nsRunDir() string             { return filepath.Join("/run", "minicloud-lab-"+l.Name) }
func (l *Lab) netnsName(host string) string { return l.Name + "-" + host }

// BridgeName is the underlay bridge in the machine's own namespace.
func (l *Lab) BridgeName() string { return l.Name + "0" }

// uplinkName is the machine-side end of host's underlay veth.
func (l *Lab) uplinkName(host string) string { return fmt.Sprintf("%s-h%d", l.Name, l.hostIndex(host)) }

// Up brings the whole lab up (or finishes bringing it up) and waits until
// every host is UP and, unless NoVMs, one VM RUNNING on each.
func (l *Lab) Up(ctx context.Context) error {
	start := time.Now()
	if err := l.save(); err != nil {
		return err
	}
	for _, d := range []string{l.pkiDir(), l.logDir(), filepath.Join(l.Dir, "pids")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if err := l.ensurePKI(); err != nil {
		return err
	}
	if err := l.ensureUnderlay(ctx); err != nil {
		return err
	}
	if err := l.startControlPlane(ctx); err != nil {
		return err
	}
	for _, h := range l.HostNames() {
		if err := l.StartHost(ctx, h); err != nil {
			return err
		}
	}
	if err := l.seed(ctx); err != nil {
		return err
	}
	l.logf("up in %s", time.Since(start).Round(time.Second))
	return nil
}

// Down stops every process of the lab and removes every namespace, link,
// mount and directory it made. It works on a half-made or half-removed lab.
func (l *Lab) Down(ctx context.Context) error {
	var errs []error
	for _, h := range l.HostNames() {
		errs = append(errs, l.removeHost(ctx, h))
	}
	errs = append(errs, l.stopControlPlane())
	errs = append(errs, l.removeUnderlay())
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := os.RemoveAll(l.Dir); err != nil {
		return fmt.Errorf("remove %s: %w", l.Dir, err)
	}
	l.logf("removed")
	return nil
}
