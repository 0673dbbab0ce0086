package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A host is a network namespace (its own links, routes, nftables, the
// metadata address 169.254.169.254) plus a mount namespace in which /run,
// /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt
// are the host's own directories under Dir/hosts/HOST. Its libvirtd,
// virtlogd, QEMU processes and agent all live in both namespaces, so
// nothing they name by path or by interface can meet another host's, the
// machine's own libvirtd, or `make up`'s all-in-one. The host's underlay
// is a veth: eth0 inside, NAME-hI on the machine's side, on the lab bridge.

// privateDirs are the directories each host has its own copy of, by mount
// point, with what they start as.
var privateDirs = []struct {
	mountPoint string
	sub        string
	seed       string // its layout copied on first use
	files      bool   // and its files (configuration, not state)
}{
	{"/run", "run", "", false},
	{"/etc/libvirt", "etc-libvirt", "/etc/libvirt", true},
	// Directories only: libvirt checks their owners and modes.
	{"/var/lib/libvirt", "lib-libvirt", "/var/lib/libvirt", false},
	// The QEMU capabilities cache: valid for every host of one machine
	// (libvirt re-probes if not), and saves each libvirtd a probe.
	{"/var/cache/libvirt", "cache-libvirt", "/var/cache/libvirt", true},
	{"/var/log/libvirt", "log-libvirt", "", false},
}

// seedSkip are the parts of the seeded directories that belong to the
// machine's own libvirtd: its domains, networks, pools, secrets and the
// runtime state of its domains.
var seedSkip = map[string]bool{
	"qemu/networks": true, "qemu/autostart": true, "storage": true, "secrets": true,
	"images": true, "boot": true,
}

func (l *Lab) netnsPath(host string) string { return "/run/netns/" + l.netnsName(host) }
func (l *Lab) mountNSPath(host string) string {
	return filepath.Join(l.nsRunDir(), host+".mnt")
}
func (l *Lab) agentData(host string) string { return filepath.Join(l.hostDir(host), "data") }

// LibvirtSocket is host's libvirtd socket, as seen from the machine.
func (l *Lab) LibvirtSocket(host string) string {
	return filepath.Join(l.hostDir(host), "run", "libvirt", "libvirt-sock")
}

// run runs a command and returns its error with its output.
func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// ensureUnderlay creates the lab bridge with the router's and the control
// nodes' addresses.
func (l *Lab) ensureUnderlay(context.Context) error {
	br := l.BridgeName()
	if !linkExists(br) {
		if err := run("ip", "link", "add", br, "type", "bridge"); err != nil {
			return err
		}
		l.logf("created bridge %s", br)
	}
	addrs := []netip.Addr{l.RouterAddr()}
	for i := 1; i <= etcdMembers; i++ {
		addrs = append(addrs, l.ControlAddr(i))
	}
	have := map[string]bool{}
	if ifc, err := net.InterfaceByName(br); err == nil {
		as, _ := ifc.Addrs()
		for _, a := range as {
			have[a.String()] = true
		}
	}
	for _, a := range addrs {
		p := netip.PrefixFrom(a, l.Subnet.Bits()).String()
		if have[p] {
			continue
		}
		if err := run("ip", "addr", "add", p, "dev", br); err != nil {
			return err
		}
	}
	return run("ip", "link", "set", br, "up")
}

func (l *Lab) removeUnderlay() error {
	var errs []error
	if linkExists(l.BridgeName()) {
		errs = append(errs, run("ip", "link", "del", l.BridgeName()))
	}
	// The directory of mount namespace files is a private bind mount of
	// itself (see ensureNamespaces).
	if isMountPoint(l.nsRunDir()) {
		errs = append(errs, syscall.Unmount(l.nsRunDir(), syscall.MNT_DETACH))
	}
	if err := os.Remove(l.nsRunDir()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// mounts returns the mount points and file system types of this process's
// mount namespace.
func mounts() map[string]string {
	out := map[string]string{}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && len(fields) > 4 {
				out[unescapeMount(fields[4])] = fields[i+1]
				break
			}
		}
	}
	return out
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isMountPoint(p string) bool { _, ok := mounts()[p]; return ok }

// ensureNamespaces creates host's network namespace with its underlay
// veth and address, and its mount namespace with its private directories.
func (l *Lab) ensureNamespaces(host string) error {
	ns := l.netnsName(host)
	if _, err := os.Stat(l.netnsPath(host)); errors.Is(err, fs.ErrNotExist) {
		if err := run("ip", "netns", "add", ns); err != nil {
			return err
		}
		l.logf("created network namespace %s", ns)
	}
	up := l.uplinkName(host)
	if !linkExists(up) {
		if err := run("ip", "link", "add", up, "type", "veth", "peer", "name", "eth0", "netns", ns); err != nil {
			return err
		}
	}
	// A partitioned host stays partitioned across Up (Heal reconnects it).
	if !l.partitioned(host) {
		if err := run("ip", "link", "set", up, "master", l.BridgeName(), "up"); err != nil {
			return err
		}
	}
	addr := netip.PrefixFrom(l.HostAddr(host), l.Subnet.Bits()).String()
	for _, c := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "set", "eth0", "up"},
	} {
		if err := run("ip", append([]string{"-n", ns}, c...)...); err != nil {
			return err
		}
	}
	if out, _ := exec.Command("ip", "-n", ns, "-o", "addr", "show", "dev", "eth0").Output(); !strings.Contains(string(out), " "+addr+" ") {
		if err := run("ip", "-n", ns, "addr", "add", addr, "dev", "eth0"); err != nil {
			return err
		}
	}

	// The mount namespace is kept by bind-mounting its nsfs file into a
	// directory that is a private mount of itself (as `ip netns` does
	// for /run/netns), so the bind never propagates into the namespace.
	if err := os.MkdirAll(l.nsRunDir(), 0o700); err != nil {
		return err
	}
	if !isMountPoint(l.nsRunDir()) {
		if err := run("mount", "--bind", l.nsRunDir(), l.nsRunDir()); err != nil {
			return err
		}
		if err := run("mount", "--make-private", l.nsRunDir()); err != nil {
			return err
		}
	}
	if mounts()[l.mountNSPath(host)] == "nsfs" {
		return nil
	}
	var script []string
	for _, d := range privateDirs {
		src := filepath.Join(l.hostDir(host), d.sub)
		if err := os.MkdirAll(src, 0o755); err != nil {
			return err
		}
		if d.seed != "" {
			if err := seedDir(d.seed, src, d.files); err != nil {
				return fmt.Errorf("seed %s of %s: %w", d.mountPoint, host, err)
			}
		}
		if err := os.MkdirAll(d.mountPoint, 0o755); err != nil {
			return err
		}
		script = append(script, fmt.Sprintf("mount --bind %q %q", src, d.mountPoint))
	}
	if err := os.WriteFile(l.mountNSPath(host), nil, 0o600); err != nil {
		return err
	}
	if err := run("unshare", "--mount="+l.mountNSPath(host), "--propagation", "private", "--",
		"sh", "-ec", strings.Join(script, "\n")); err != nil {
		return fmt.Errorf("mount namespace of %s: %w", host, err)
	}
	l.logf("created namespaces of %s (underlay %s)", host, addr)
	return nil
}

// seedDir gives a host its own copy of a system directory's layout
// (directories with owner and mode) and, with files, its regular files;
// never the machine's domains, networks or runtime state.
func seedDir(from, to string, files bool) error {
	if _, err := os.Stat(filepath.Join(to, ".seeded")); err == nil {
		return nil
	}
	err := filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, _ := filepath.Rel(from, p)
		// Domains and networks of the machine's own libvirtd, and
		// runtime state of its domains, are not the host's.
		if d.IsDir() && (strings.HasPrefix(d.Name(), "domain-") || seedSkip[rel]) {
			return filepath.SkipDir
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		dst := filepath.Join(to, rel)
		switch {
		case d.IsDir():
			if err := os.MkdirAll(dst, info.Mode().Perm()); err != nil {
				return err
			}
		case info.Mode().IsRegular() && files:
			if filepath.Dir(rel) == "qemu" && strings.HasSuffix(rel, ".xml") {
				return nil // a domain definition
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if err := os.WriteFile(dst, b, info.Mode().Perm()); err != nil {
				return err
			}
		default:
			return nil // sockets, links: runtime state
		}
		if err := os.Chmod(dst, info.Mode().Perm()); err != nil {
			return err
		}
		return os.Lchown(dst, int(st.Uid), int(st.Gid))
	})
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(to, ".seeded"), nil, 0o600)
}

// hostProcs are a host's daemons in start order.
func (l *Lab) hostProcs(host string) []proc {
	c := l.HostCapacity(host)
	a := l.HostAddr(host)
	return []proc{
		{Name: host + "-virtlogd", Host: host, Argv: []string{"/usr/sbin/virtlogd"}},
		{Name: host + "-libvirtd", Host: host, Argv: []string{"/usr/sbin/libvirtd"}},
		{Name: host + "-agent", Host: host, Argv: append([]string{l.bin("minicloudd"), "agent",
			"--host-name", host,
			"--data-dir", l.agentData(host),
			"--agent-listen", netip.AddrPortFrom(a, agentPort).String(),
			"--agent-metrics-listen", netip.AddrPortFrom(a, agentMetricsPort).String(),
			"--vcpus", strconv.Itoa(c.VCPUs),
			"--memory", strconv.FormatInt(c.MemoryMiB, 10),
			"--disk", strconv.FormatInt(c.DiskGiB, 10),
			// Guests may reach no control-plane port: the underlay
			// carries etcd, the APIs, every agent and libvirt.
			"--protected-nets", l.Subnet.String(),
			"--identity-key", l.identityKey(),
		}, l.agentAPIArgs()...)},
	}
}

// agentAPIArgs are the flags that tell an agent where the API is: the one
// place to change when agents join with a token or take several API
// addresses.
func (l *Lab) agentAPIArgs() []string {
	return []string{"--api", l.ClientEndpoint()}
}

// StartHost boots host: namespaces (if missing), then virtlogd, libvirtd
// and the agent. A host that runs is left alone; one that was stopped
// boots again with its domains defined, which its agent restarts.
func (l *Lab) StartHost(ctx context.Context, host string) error {
	if err := l.checkHost(host); err != nil {
		return err
	}
	if err := l.ensureNamespaces(host); err != nil {
		return err
	}
	if err := os.MkdirAll(l.agentData(host), 0o755); err != nil {
		return err
	}
	procs := l.hostProcs(host)
	if pids, _ := nsPids(l.netnsPath(host)); len(pids) == 0 {
		// A fresh boot: /run is a tmpfs on a real machine.
		run := filepath.Join(l.hostDir(host), "run")
		entries, _ := os.ReadDir(run)
		for _, e := range entries {
			if err := os.RemoveAll(filepath.Join(run, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := l.start(procs[0]); err != nil {
		return err
	}
	if err := l.start(procs[1]); err != nil {
		return err
	}
	sock := l.LibvirtSocket(host)
	if err := poll(ctx, 2*time.Minute, "libvirtd of "+host, func() error {
		if _, ok := l.running(procs[1].Name); !ok {
			return fmt.Errorf("libvirtd exited; see %s:\n%s", l.LogFile(procs[1].Name), l.tail(procs[1].Name))
		}
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		return err
	}
	return l.start(procs[2])
}

// StopHost powers host off: every process in it (agent, libvirtd,
// virtlogd, QEMU) is killed at once, and what a reboot loses (links other
// than the underlay, nftables rules) is removed. Its disks, domain
// definitions and namespaces stay, so StartHost boots it again.
func (l *Lab) StopHost(ctx context.Context, host string) error {
	if err := l.checkHost(host); err != nil {
		return err
	}
	if err := l.killNS(host); err != nil {
		return err
	}
	for _, p := range l.hostProcs(host) {
		_ = os.Remove(l.pidPath(p.Name))
	}
	if _, err := os.Stat(l.netnsPath(host)); err != nil {
		return nil
	}
	ns := l.netnsName(host)
	out, err := exec.Command("ip", "-n", ns, "-o", "link", "show").Output()
	if err != nil {
		return fmt.Errorf("links of %s: %w", host, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name == "lo" || name == "eth0" {
			continue
		}
		_ = run("ip", "-n", ns, "link", "del", name)
	}
	if err := run("ip", "netns", "exec", ns, "nft", "flush", "ruleset"); err != nil {
		return err
	}
	l.logf("%s powered off", host)
	return nil
}

// killNS kills every process in host's network namespace and waits for
// them to go.
func (l *Lab) killNS(host string) error {
	for i := 0; ; i++ {
		pids, err := nsPids(l.netnsPath(host))
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if i > 200 {
			return fmt.Errorf("processes %v of %s do not die", pids, host)
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// removeHost shuts host down cleanly (domains destroyed through its own
// libvirtd, so libvirt removes their cgroups), then removes its
// namespaces and underlay link.
func (l *Lab) removeHost(ctx context.Context, host string) error {
	procs := l.hostProcs(host)
	var errs []error
	errs = append(errs, l.stop(procs[2].Name, syscall.SIGTERM, 15*time.Second))
	if _, ok := l.running(procs[1].Name); ok {
		out, _ := l.Output(ctx, host, "virsh", "list", "--name")
		for _, d := range strings.Fields(out) {
			if _, err := l.Output(ctx, host, "virsh", "destroy", d); err != nil {
				l.logf("destroy %s on %s: %v", d, host, err)
			}
		}
	}
	errs = append(errs, l.stop(procs[1].Name, syscall.SIGTERM, 15*time.Second))
	errs = append(errs, l.stop(procs[0].Name, syscall.SIGTERM, 5*time.Second))
	errs = append(errs, l.killNS(host))
	errs = append(errs, l.removeCgroups(host))
	if mounts()[l.mountNSPath(host)] == "nsfs" {
		errs = append(errs, syscall.Unmount(l.mountNSPath(host), syscall.MNT_DETACH))
	}
	if err := os.Remove(l.mountNSPath(host)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	if linkExists(l.uplinkName(host)) {
		errs = append(errs, run("ip", "link", "del", l.uplinkName(host)))
	}
	if _, err := os.Stat(l.netnsPath(host)); err == nil {
		errs = append(errs, run("ip", "netns", "del", l.netnsName(host)))
	}
	return errors.Join(errs...)
}

// partitioned says whether host's underlay is cut.
func (l *Lab) partitioned(host string) bool {
	_, err := os.Stat(filepath.Join(l.hostDir(host), "partitioned"))
	return err == nil
}

// Partition cuts host off the underlay, as a failed switch port would: its
// link stays up (the host notices nothing but silence), but it is no
// longer on the bridge, so it reaches neither the control plane nor any
// other host, nor they it. Its VMs keep running.
func (l *Lab) Partition(host string) error {
	if err := l.checkHost(host); err != nil {
		return err
	}
	if err := os.MkdirAll(l.hostDir(host), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(l.hostDir(host), "partitioned"), nil, 0o644); err != nil {
		return err
	}
	if err := run("ip", "link", "set", l.uplinkName(host), "nomaster"); err != nil {
		return err
	}
	l.logf("%s partitioned", host)
	return nil
}

// Heal puts host back on the underlay.
func (l *Lab) Heal(host string) error {
	if err := l.checkHost(host); err != nil {
		return err
	}
	if err := run("ip", "link", "set", l.uplinkName(host), "master", l.BridgeName(), "up"); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(l.hostDir(host), "partitioned")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	l.logf("%s healed", host)
	return nil
}

// Command returns a command that runs argv inside host, as a shell on
// that machine would: its network, its /run and libvirt, its PATH.
func (l *Lab) Command(ctx context.Context, host string, argv ...string) (*exec.Cmd, error) {
	if err := l.checkHost(host); err != nil {
		return nil, err
	}
	if mounts()[l.mountNSPath(host)] != "nsfs" {
		return nil, fmt.Errorf("%s has no namespaces (make lab)", host)
	}
	if len(argv) == 0 {
		argv = []string{"/bin/bash"}
	}
	args := append([]string{"--net=" + l.netnsPath(host), "--mount=" + l.mountNSPath(host), "--"}, argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = append(os.Environ(), "LIBVIRT_DEFAULT_URI=qemu:///system", "MINICLOUD_LAB_HOST="+host)
	return cmd, nil
}

// Output runs argv inside host (see Command) and returns its standard
// output; the error carries its standard error.
func (l *Lab) Output(ctx context.Context, host string, argv ...string) (string, error) {
	cmd, err := l.Command(ctx, host, argv...)
	if err != nil {
		return "", err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s on %s: %w: %s", strings.Join(argv, " "), host, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// VMIDs are the VMs whose state directory is on host.
func (l *Lab) VMIDs(host string) []string {
	entries, _ := os.ReadDir(filepath.Join(l.agentData(host), "agent", "vms"))
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}

// LeftoverCgroups lists the cgroup directories libvirt made for host's
// domains that are still there. libvirt removes them when it destroys a
// domain, but not when its QEMU dies with libvirtd (a host powered off).
func (l *Lab) LeftoverCgroups(host string) []string {
	var out []string
	for _, id := range l.VMIDs(host) {
		m, _ := filepath.Glob("/sys/fs/cgroup/*/machine/qemu-*-mc-" + id + ".libvirt-qemu")
		out = append(out, m...)
	}
	return out
}

// removeCgroups removes what LeftoverCgroups finds (empty once the
// host's processes are gone), innermost first.
func (l *Lab) removeCgroups(host string) error {
	var errs []error
	for _, dir := range l.LeftoverCgroups(host) {
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}
