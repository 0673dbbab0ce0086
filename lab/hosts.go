package lab

import (
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

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// A host's daemons (hostProcs), its power (StartHost, StopHost), its
// network faults (Partition, Heal) and commands run inside it (Command).

func (l *Lab) netnsPath(host string) string { return "/run/netns/" + l.netnsName(host) }
func (l *Lab) mountNSPath(host string) string {
	return filepath.Join(l.nsRunDir(), host+".mnt")
}
func (l *Lab) agentData(host string) string { return filepath.Join(l.hostDir(host), "data") }

// AgentStateDir is host's agent state directory (<data-dir>/agent): a
// directory per VM under vms/, trashed VMs under trash/.
func (l *Lab) AgentStateDir(host string) string { return filepath.Join(l.agentData(host), "agent") }

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

// hostProcs are a host's daemons in start order.
// HostFenceAfter is every lab agent's --fence-after: shorter than the
// 15 s lease, with room for a heartbeat (every 5 s) to be late once.
const HostFenceAfter = 12 * time.Second

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
			// The underlay carries the VXLAN tunnels between hosts.
			"--tunnel-ip", a.String(),
			// A host cut off from the control plane destroys its
			// domains, so its VMs can be evacuated (docs/lab.md).
			"--fence-after", HostFenceAfter.String(),
		}, l.agentAPIArgs(host)...)},
		// Self-fencing that does not need the agent alive: a killed
		// agent's domains are destroyed all the same.
		{Name: host + "-fenceguard", Host: host, Argv: []string{l.bin("minicloudd"), "fence-guard",
			"--data-dir", l.agentData(host), "--fence-after", HostFenceAfter.String()}},
	}
}

// agentAPIArgs are the flags that tell host's agent where the API is: the
// one place to change when agents take several API addresses (issue 10,
// section 4).
func (l *Lab) agentAPIArgs(host string) []string {
	_ = host
	return []string{"--api", l.ClientEndpoint()}
}

// agentJoinArgs are the flags of an agent's first start: a one-time join
// token and the CA pin (kubeadm's TLS bootstrap, docs/security.md). Once the
// host holds its certificate (DATA_DIR/agent/pki/host.crt) it needs none,
// and a restarted host is never given a new token.
func (l *Lab) agentJoinArgs(ctx context.Context, host string) ([]string, error) {
	if _, err := os.Stat(filepath.Join(l.agentData(host), "agent", "pki", "host.crt")); err == nil {
		return nil, nil
	}
	c, err := l.Client(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	tok, err := c.Hosts.CreateJoinToken(ctx, &minicloudv1.CreateJoinTokenRequest{
		TtlSeconds: int64((15 * time.Minute).Seconds()), Description: "lab " + l.Name + " " + host,
	})
	if err != nil {
		return nil, fmt.Errorf("join token for %s: %w", host, err)
	}
	return []string{"--join", tok.Token, "--ca-hash", tok.CaHash}, nil
}

// StartHost boots host: namespaces (if missing), then virtlogd, libvirtd,
// the fence guard and the agent. A host that runs is left alone; one that was stopped
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
		runDir := filepath.Join(l.hostDir(host), "run")
		entries, _ := os.ReadDir(runDir)
		for _, e := range entries {
			if err := os.RemoveAll(filepath.Join(runDir, e.Name())); err != nil {
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
	if _, ok := l.running(procs[3].Name); !ok {
		if err := l.start(procs[3]); err != nil {
			return err
		}
	}
	if _, ok := l.running(procs[2].Name); ok {
		return nil
	}
	join, err := l.agentJoinArgs(ctx, host)
	if err != nil {
		return err
	}
	agent := procs[2]
	agent.Argv = append(agent.Argv, join...)
	return l.start(agent)
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
	errs = append(errs, l.stop(procs[3].Name, syscall.SIGTERM, 5*time.Second))
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
