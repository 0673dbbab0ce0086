// Package cloudinittest runs real cloud-init (Debian 12's 22.4) readers
// against minicloud metadata in tests: cloudinit_client.py calls
// cloud-init's own Ec2, OpenStack, ConfigDrive and NoCloud code and prints
// what cloud-init sees as JSON.
package cloudinittest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// DefaultPath is where hosts unpack Debian's cloud-init .deb
// (dpkg -x cloud-init_*.deb /opt/cloud-init-lib) when it is not installed.
const DefaultPath = "/opt/cloud-init-lib/usr/lib/python3/dist-packages"

// Command returns the client run with args ("service <url>", "config-2
// <dir>", "cidata <dir>"), or skips t when cloud-init's Python package is
// not importable (installed, at DefaultPath, or at
// $MINICLOUD_CLOUDINIT_PYTHONPATH).
func Command(t testing.TB, args ...string) *exec.Cmd {
	t.Helper()
	const py = "/usr/bin/python3" // Debian's, with the python3-* packages
	env := os.Environ()
	pp := os.Getenv("MINICLOUD_CLOUDINIT_PYTHONPATH")
	if pp == "" {
		if _, err := os.Stat(filepath.Join(DefaultPath, "cloudinit")); err == nil {
			pp = DefaultPath
		}
	}
	if pp != "" {
		env = append(env, "PYTHONPATH="+pp)
	}
	probe := exec.Command(py, "-c", "import cloudinit.sources.helpers.openstack, cloudinit.sources.helpers.ec2")
	probe.Env = env
	if out, err := probe.CombinedOutput(); err != nil {
		t.Skipf("cloud-init's Python package is not importable (%v: %s); see docs/metadata.md, Tests", err, strings.TrimSpace(string(out)))
	}
	_, self, _, _ := runtime.Caller(0)
	cmd := exec.Command(py, append([]string{filepath.Join(filepath.Dir(self), "cloudinit_client.py")}, args...)...)
	cmd.Env = env
	return cmd
}

// Stderr returns what a failed command wrote to stderr.
func Stderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

// Render hands req ({"network_data": …}, {"network_config": …} or
// {"ec2_network": …, "macs": {mac: nic}}) to cloud-init's converters and its
// ENI, netplan, networkd and sysconfig renderers, and returns the files each
// renderer wrote, by renderer and path. It skips t like Command.
func Render(t testing.TB, req any) map[string]map[string]string {
	t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "render.json")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := Command(t, "render", p).Output()
	if err != nil {
		t.Fatalf("cloud-init render %s: %v: %s", b, err, Stderr(err))
	}
	var got struct {
		Rendered map[string]map[string]string `json:"rendered"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("cloud-init render: %v: %s", err, out)
	}
	return got.Rendered
}
