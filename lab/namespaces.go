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
