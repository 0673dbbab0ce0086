package agent_test

// Real cloud-init as the conformance client: the Debian 12 cloud image
// (hack/images/build-debian.sh: cloud-init 22.4, openssh-server, the Debian
// kernel) boots through `minicloud vm create` on the real all-in-one, and
// what the guest did is checked on its serial console and by SSH from the
// host into it — never against minicloud's own records.

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
)

// debianBootDeadline bounds one Debian boot under TCG on a shared 2-core
// machine: kernel, systemd and four cloud-init stages take minutes there,
// and up to twenty at a load of 30 (measured here).
const debianBootDeadline = 25 * time.Minute

// debianImage builds (or reuses, from its cache) the Debian cloud image,
// or takes a prebuilt one from $MINICLOUD_DEBIAN_IMAGE (a directory laid out
// like images/out/debian, e.g. a CI artifact or a copy made while
// build-debian.sh rewrites images/out).
func debianImage(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("MINICLOUD_DEBIAN_IMAGE"); dir != "" {
		return dir
	}
	root := cloudtest.RepoRoot()
	cmd := exec.Command(filepath.Join(root, "hack/images/build-debian.sh"))
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("the Debian cloud image cannot be built here (needs root and the Debian mirror): %v\n%s", err, out)
	}
	return filepath.Join(root, "images/out/debian")
}

// newDebianCloud starts a cloud with a network of its own, the image
// "debian" and a flavor whose disk holds the image's virtual size.
func newDebianCloud(t *testing.T) *cloudtest.Cloud {
	t.Helper()
	requireHypervisorHost(t)
	for _, tool := range []string{"ssh", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	return newCloudWithImage(t, "debian", debianImage(t), "ci", "1024", "4", "--mtu", debianNetworkMTU)
}

// sshKeyPair makes an ed25519 key pair in dir and returns the private key's
// path (the public key is path + ".pub").
func sshKeyPair(t *testing.T, dir string) string {
	t.Helper()
	key := filepath.Join(dir, "id_ed25519")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudinit-e2e", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v\n%s", err, out)
	}
	return key
}

// guestSSH runs a command in the guest over SSH as user, with key.
func guestSSH(key, user, ip, command string) (string, error) {
	cmd := exec.Command("ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", user+"@"+ip, command)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// waitConsole waits until the VM's serial console matches re n times (the
// console spans the guest's reboots), and returns the console. Console
// output has no event stream: it is read again every second until the
// deadline.
func waitConsole(t *testing.T, c *cloudtest.Cloud, name string, re *regexp.Regexp, n int, deadline time.Duration) string {
	t.Helper()
	end := time.Now().Add(deadline)
	var log string
	for time.Now().Before(end) {
		resp, err := c.Client.VMs.GetConsoleLog(context.Background(), &minicloudv1.GetConsoleLogRequest{Name: name, TailBytes: 1 << 20})
		if err != nil {
			t.Fatalf("console log of %s: %v", name, err)
		}
		log = string(resp.GetData())
		if len(re.FindAllStringIndex(log, n)) >= n {
			return log
		}
		if strings.Contains(log, "Kernel panic - not syncing") {
			t.Fatalf("the guest kernel of %s panicked; console:\n%s", name, log)
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("console of %s never matched %q %d times within %v; it shows:\n%s", name, re, n, deadline, log)
	return ""
}

// blockMetadata drops every packet from ip to 169.254.169.254 in a
// nftables table of the test's own, so a config-drive guest provably does
// not depend on the metadata service. It returns how many packets it
// dropped so far, and unblock, which lifts the block (the test's cleanup
// does too).
func blockMetadata(t *testing.T, ip string) (dropped func() string, unblock func()) {
	t.Helper()
	table := fmt.Sprintf("mc_e2e_nomd_%d", rand.IntN(1<<30))
	rules := fmt.Sprintf(`table inet %s {
	chain input {
		type filter hook input priority -10; policy accept;
		ip saddr %s ip daddr 169.254.169.254 counter drop
	}
}
`, table, ip)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	unblock = func() { _ = exec.Command("nft", "delete", "table", "inet", table).Run() }
	t.Cleanup(unblock)
	return func() string {
		out, _ := exec.Command("nft", "list", "table", "inet", table).CombinedOutput()
		if m := regexp.MustCompile(`counter packets (\d+)`).FindSubmatch(out); m != nil {
			return string(m[1])
		}
		return "?"
	}, unblock
}

var (
	// cloud-init's last line: "Cloud-init v. 22.4 finished at <date>.
	// Datasource DataSourceOpenStackLocal [net,ver=2].  Up 95.12 seconds"
	cloudInitFinished = regexp.MustCompile(`Cloud-init v\. \S+ finished at [^\n]*Datasource (\S+)[^\n]*Up ([0-9.]+) seconds`)
	// Where cloud-init waited on a URL: each costs the guest seconds.
	cloudInitURLTrouble = regexp.MustCompile(`(?i)(Giving up on|Calling '[^']*' failed|url_helper|Read timed out|timed out after|waiting for metadata service)[^\n]*`)
)

// debianNetworkMTU is the MTU of the Debian test's network: not Linux's
// 1500, so a guest that has it got it from minicloud (DHCP option 26).
const debianNetworkMTU = "1400"

// peerVM is another VM on the same network, whose name a guest must
// resolve through the network's DNS.
type peerVM struct{ name, ip string }

func TestCloudInitDebian(t *testing.T) {
	c := newDebianCloud(t)
	// The cheap "other VM": a tiny guest on the same network. Its name is
	// in the network's DNS zone as soon as it has an address.
	importImage(t, c, "tiny", cloudtest.TinyImage(t))
	c.MustMC("flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	peer := peerVM{name: fmt.Sprintf("peer-%06x", rand.IntN(1<<24))}
	c.MustMC("vm", "create", peer.name, "--image", "tiny", "--flavor", "tiny")
	t.Cleanup(func() { _, _, _ = c.MC("vm", "delete", peer.name, "--wait", "--timeout", "3m") })
	pvm, err := c.Client.VMs.GetVM(context.Background(), &minicloudv1.GetVMRequest{Name: peer.name})
	if err != nil || len(pvm.GetStatus().GetAddresses()) == 0 {
		t.Fatalf("peer VM %s: %v %v", peer.name, err, pvm.GetStatus())
	}
	peer.ip = pvm.GetStatus().GetAddresses()[0].GetIp()
	t.Run("guests", func(t *testing.T) {
		for _, tc := range []struct {
			name        string
			configDrive bool
			datasource  string // what the final message must name
		}{
			{"metadata-service", false, "DataSourceOpenStack"},
			{"config-drive", true, "DataSourceConfigDrive"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				// The two guests boot at once: under TCG each takes minutes.
				t.Parallel()
				bootAndCheckDebian(t, c, tc.configDrive, tc.datasource, peer)
			})
		}
	})
}

func bootAndCheckDebian(t *testing.T, c *cloudtest.Cloud, configDrive bool, datasource string, peer peerVM) {
	dir := t.TempDir()
	key := sshKeyPair(t, dir)
	suffix := fmt.Sprintf("%06x", rand.IntN(1<<24))
	name := "ci-" + suffix
	hostname := "cihost-" + suffix
	runcmdMarker := "MC-RUNCMD-" + suffix
	fileMarker := "MC-WRITEFILE-" + suffix
	userData := fmt.Sprintf(`#cloud-config
hostname: %s
write_files:
  - path: /etc/minicloud-e2e
    content: "%s\n"
runcmd:
  - [ sh, -c, "echo %s > /dev/console" ]
`, hostname, fileMarker, runcmdMarker)
	udPath := filepath.Join(dir, "user-data")
	if err := os.WriteFile(udPath, []byte(userData), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"vm", "create", name, "--image", "debian", "--flavor", "ci",
		"--user-data", "@" + udPath, "--ssh-key", key + ".pub"}
	if configDrive {
		args = append(args, "--config-drive")
	}
	c.MustMC(args...)
	// A failed check must not leave a domain running after the cloud
	// stops (the agent keeps domains across its own restarts by design).
	t.Cleanup(func() {
		if _, errOut, code := c.MC("vm", "delete", name, "--wait", "--timeout", "3m"); code != 0 && code != 3 /* not found: deleted by the test */ {
			t.Errorf("delete %s: exit %d: %s", name, code, errOut)
		}
	})
	vm, err := c.Client.VMs.GetVM(context.Background(), &minicloudv1.GetVMRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	if len(vm.GetStatus().GetAddresses()) == 0 {
		t.Fatalf("VM %s has no address after create: %v", name, vm.GetStatus())
	}
	ip := vm.GetStatus().GetAddresses()[0].GetIp()
	id := vm.GetMeta().GetId()
	var dropped func() string
	unblock := func() {}
	if configDrive {
		// Addresses are allocated by the API, so the block is in place
		// long before the agent has the image and starts the domain.
		dropped, unblock = blockMetadata(t, ip)
	}
	start := time.Now()
	vm = waitVM(t, c, name, "running", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	t.Logf("%s (%s, %s) RUNNING after %v", name, id, ip, time.Since(start).Round(time.Second))

	log := waitConsole(t, c, name, cloudInitFinished, 1, debianBootDeadline)
	m := cloudInitFinished.FindStringSubmatch(log)
	t.Logf("%s: cloud-init finished %v after RUNNING on %s, guest up %s s", name, time.Since(start).Round(time.Second), m[1], m[2])
	if !strings.HasPrefix(m[1], datasource) {
		t.Errorf("cloud-init finished on %s, want %s*", m[1], datasource)
	}
	for _, trouble := range cloudInitURLTrouble.FindAllString(log, -1) {
		t.Errorf("cloud-init waited on a URL: %s", trouble)
	}
	if !strings.Contains(log, runcmdMarker) {
		t.Errorf("the runcmd marker %s is not on the console", runcmdMarker)
	}
	if configDrive {
		if n := dropped(); n != "0" {
			// Not an error: the guest configured itself, but it tried.
			t.Logf("the config-drive guest sent %s packets to 169.254.169.254 (dropped)", n)
		}
		// cloud-init did without the service; from now on the guest must
		// reach it like any other.
		unblock()
	}
	// SSH with the key from the metadata: cloud-init's Debian default user
	// is "debian"; root logins are refused by cloud-init's disable_root.
	out := sshUntil(t, key, ip, "hostname; cat /etc/minicloud-e2e; "+
		"sudo -n cat /run/cloud-init/instance-data.json | grep -o '\"instance_id\": \"[^\"]*\"' | head -1", log)
	for _, want := range []string{hostname + "\n", fileMarker, `"instance_id": "` + id + `"`} {
		if !strings.Contains(out, want) {
			t.Errorf("guest says %q, want it to contain %q", out, want)
		}
	}
	gw := vm.GetStatus().GetAddresses()[0].GetGateway()
	first := checkGuestNetwork(t, "first boot", key, ip, gw, id, peer, log)

	// cloud-init's second boot: same instance, so only per-boot modules
	// run, and the network cloud-init wrote on the first boot (and the
	// DHCP answer) must bring everything back.
	_, _ = guestSSH(key, "debian", ip, "sudo -n systemctl reboot") // the connection drops
	log = waitConsole(t, c, name, cloudInitFinished, 2, debianBootDeadline)
	all := cloudInitFinished.FindAllStringSubmatch(log, -1)
	second := all[len(all)-1]
	t.Logf("%s: second boot: cloud-init finished on %s, guest up %s s", name, second[1], second[2])
	if !strings.HasPrefix(second[1], datasource) {
		t.Errorf("second boot: cloud-init finished on %s, want %s*", second[1], datasource)
	}
	if i := strings.Index(log, m[0]); i >= 0 {
		for _, trouble := range cloudInitURLTrouble.FindAllString(log[i+len(m[0]):], -1) {
			t.Errorf("second boot: cloud-init waited on a URL: %s", trouble)
		}
	}
	again := checkGuestNetwork(t, "second boot", key, ip, gw, id, peer, log)
	if first["bootid"] == again["bootid"] {
		t.Errorf("boot id %s unchanged: the guest did not reboot", first["bootid"])
	}

	c.MustMC("vm", "delete", name)
	waitVM(t, c, name, "deleted", nil)
	assertNothingLeft(t, c, id)
}

// sshUntil runs command in the guest as "debian", retrying for two minutes
// while sshd may still be starting after cloud-init's last stage.
func sshUntil(t *testing.T, key, ip, command, console string) string {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := guestSSH(key, "debian", ip, command)
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh debian@%s: %v\n%s\nconsole:\n%s", ip, err, out, console)
		}
		time.Sleep(2 * time.Second)
	}
}

// guestNetworkScript prints, one "key: value" line each, what the guest's
// network looks like from inside; %[1]s is the peer VM's name.
const guestNetworkScript = `dev=$(ip -4 route show default | awk '{print $5; exit}')
echo "default: $(ip -4 route show default | head -1)"
echo "mtu: $(cat /sys/class/net/${dev:-eth0}/mtu)"
echo "ec2: $(curl -sf -m 30 http://169.254.169.254/latest/meta-data/instance-id)"
echo "openstack: $(curl -sf -m 30 http://169.254.169.254/openstack/latest/meta_data.json | grep -o '"uuid": *"[^"]*"')"
echo "gce: $(curl -sf -m 30 -H 'Metadata-Flavor: Google' http://169.254.169.254/computeMetadata/v1/instance/id)"
echo "gce-dns: $(getent hosts metadata.google.internal)"
echo "peer: $(getent hosts %[1]s)"
echo "peer-fqdn: $(getent hosts %[1]s.minicloud.internal)"
echo "resolv: $(grep -E '^(nameserver|search)' /etc/resolv.conf | tr '\n' ' ')"
echo "eni: $(grep -E 'inet (dhcp|static)|route' /etc/network/interfaces.d/50-cloud-init | tr -s ' \n' ' ')"
echo "net-tools: $(command -v route || echo absent)"
echo "resolvconf: $(command -v resolvconf || echo absent)"
echo "status: $(cloud-init status)"
echo "bootid: $(cat /proc/sys/kernel/random/boot_id)"
`

// checkGuestNetwork checks from inside the guest that the network
// cloud-init set up (DHCP, from network_data.json's "ipv4_dhcp") gives it a
// default route via the gateway, the network's MTU, all three metadata
// trees at 169.254.169.254, and a resolver that knows
// metadata.google.internal and the other VM — on an image without net-tools
// and resolvconf. It returns what the guest said, by key.
func checkGuestNetwork(t *testing.T, when, key, ip, gw, id string, peer peerVM, console string) map[string]string {
	t.Helper()
	out := sshUntil(t, key, ip, fmt.Sprintf(guestNetworkScript, peer.name), console)
	t.Logf("%s, %s: guest network:\n%s", ip, when, out)
	got := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, ": "); ok {
			got[k] = strings.TrimSpace(v)
		}
	}
	for _, c := range []struct{ key, want string }{
		{"default", "default via " + gw + " "},
		{"mtu", debianNetworkMTU},
		{"ec2", id},
		{"openstack", id},
		{"gce", id},
		{"gce-dns", "169.254.169.254 "},
		{"peer", peer.ip + " "},
		{"peer-fqdn", peer.ip + " "},
		{"resolv", "nameserver " + gw},
		{"resolv", "search minicloud.internal"},
		{"eni", "inet dhcp"},
		{"net-tools", "absent"},
		{"resolvconf", "absent"},
		{"status", "status: done"},
	} {
		v, ok := got[c.key]
		if !ok || !strings.Contains(v+" ", c.want) {
			t.Errorf("%s, %s: guest's %s is %q, want it to contain %q", ip, when, c.key, v, c.want)
		}
	}
	if strings.Contains(got["eni"], "route") || strings.Contains(got["eni"], "static") {
		t.Errorf("%s, %s: cloud-init rendered a static network: %s", ip, when, got["eni"])
	}
	return got
}
