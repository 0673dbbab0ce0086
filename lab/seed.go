package lab

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// What `make up` creates, created the same way in the lab: network
// default, flavors tiny and small, image tiny; and one VM per host.

// VMName is the name of the VM Up boots on host.
func VMName(host string) string { return "vm-" + host }

// Client dials the lab's API (the caller closes it).
func (l *Lab) Client(ctx context.Context) (*client.Client, error) {
	return l.ClientOf(ctx, l.ClientEndpoint())
}

// ClientOf dials one API endpoint of the lab (e.g. APIEndpoints()[1]).
func (l *Lab) ClientOf(ctx context.Context, endpoint string) (*client.Client, error) {
	opts, err := l.apiDialOptions()
	if err != nil {
		return nil, err
	}
	return client.Dial(ctx, endpoint, opts...)
}

// writeCLIConfig writes the config file that points the minicloud CLI at
// the lab.
func (l *Lab) writeCLIConfig() error {
	body := fmt.Sprintf("# minicloud lab %s: export MINICLOUD_CONFIG=%s\nendpoints:\n", l.Name, l.CLIConfig())
	for _, ep := range l.APIEndpoints() {
		body += "  - " + ep + "\n"
	}
	body += "ca: " + l.ClusterCA() + "\n"
	token, err := l.AdminToken()
	if err != nil {
		return err
	}
	body += "token: " + token + "\n"
	return os.WriteFile(l.CLIConfig(), []byte(body), 0o600)
}

// CLI runs the minicloud CLI against the lab and returns its output.
func (l *Lab) CLI(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, l.bin("minicloud"), args...)
	cmd.Env = append(os.Environ(), "MINICLOUD_CONFIG="+l.CLIConfig(), "MINICLOUD_ENDPOINT=", "MINICLOUD_CA_CERT=", "MINICLOUD_TOKEN=")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("minicloud %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func (l *Lab) seed(ctx context.Context) error {
	if err := l.writeCLIConfig(); err != nil {
		return err
	}
	c, err := l.Client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := l.WaitHostsUp(ctx, 3*time.Minute); err != nil {
		return err
	}
	created := func(what string, err error) error {
		if err != nil && !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("create %s: %w", what, err)
		}
		return nil
	}
	_, err = c.Networks.CreateNetwork(ctx, &minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.99.0.0/24"})
	if err := created("network default", err); err != nil {
		return err
	}
	for _, f := range []*minicloudv1.CreateFlavorRequest{
		{Name: "tiny", Vcpus: 1, MemoryMib: 256, DiskGib: 1},
		{Name: "small", Vcpus: 1, MemoryMib: 1024, DiskGib: 4},
	} {
		_, err := c.Flavors.CreateFlavor(ctx, f)
		if err := created("flavor "+f.Name, err); err != nil {
			return err
		}
	}
	if l.Images["tiny"] == "" {
		return fmt.Errorf("no tiny image configured (hack/images/build-tiny.sh builds images/out/tiny)")
	}
	for name, dir := range l.Images {
		if err := l.importImage(ctx, c, name, dir); err != nil {
			return err
		}
	}
	if l.NoVMs {
		return nil
	}
	for _, h := range l.HostNames() {
		_, err := c.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{
			Name:      VMName(h),
			RequestId: "lab-" + VMName(h),
			Spec:      &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny", TargetHost: h},
		})
		if err := created("VM "+VMName(h), err); err != nil {
			return err
		}
	}
	for _, h := range l.HostNames() {
		if _, err := l.WaitVM(ctx, VMName(h), minicloudv1.VMPhase_VM_PHASE_RUNNING, 10*time.Minute); err != nil {
			return err
		}
		l.logf("%s RUNNING on %s", VMName(h), h)
	}
	return nil
}

// WaitHostsUp waits until every host of the lab is registered and UP.
func (l *Lab) WaitHostsUp(ctx context.Context, timeout time.Duration) error {
	c, err := l.Client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return poll(ctx, timeout, "hosts", func() error {
		resp, err := c.Hosts.ListHosts(ctx, &minicloudv1.ListHostsRequest{})
		if err != nil {
			return err
		}
		up := map[string]bool{}
		for _, h := range resp.Hosts {
			up[h.GetMeta().GetName()] = h.State == minicloudv1.HostState_HOST_STATE_UP
		}
		for _, h := range l.HostNames() {
			if !up[h] {
				return fmt.Errorf("%s is not UP (see %s)", h, l.LogFile(h+"-agent"))
			}
		}
		return nil
	})
}

// WaitVM waits until the named VM reaches phase; ERROR fails at once.
func (l *Lab) WaitVM(ctx context.Context, name string, phase minicloudv1.VMPhase, timeout time.Duration) (*minicloudv1.VM, error) {
	c, err := l.Client(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	var vm *minicloudv1.VM
	err = poll(ctx, timeout, "VM "+name, func() error {
		v, err := c.VMs.GetVM(ctx, &minicloudv1.GetVMRequest{Name: name})
		if err != nil {
			return err
		}
		vm = v
		switch p := v.GetStatus().GetPhase(); {
		case p == phase:
			return nil
		case p == minicloudv1.VMPhase_VM_PHASE_ERROR && phase != p:
			return permanentError{fmt.Errorf("%s is in ERROR on %q: %s", name, v.GetStatus().GetHost(), v.GetStatus().GetMessage())}
		default:
			return fmt.Errorf("%s is %s on %q", name, p, v.GetStatus().GetHost())
		}
	})
	return vm, err
}

// importImage uploads an image built by hack/images unless it exists.
func (l *Lab) importImage(ctx context.Context, c *client.Client, name, dir string) error {
	_, err := c.Images.GetImage(ctx, &minicloudv1.GetImageRequest{Name: name})
	if err == nil {
		return nil
	}
	if !errdefs.IsNotFound(err) {
		return fmt.Errorf("image %s: %w", name, err)
	}
	// Public, as `make up` imports them: every project of the lab boots them.
	args := []string{"image", "create", name, "--public", "--file", filepath.Join(dir, "disk.qcow2")}
	if _, err := os.Stat(filepath.Join(dir, "vmlinuz")); err == nil {
		cmdline, err := os.ReadFile(filepath.Join(dir, "cmdline"))
		if err != nil {
			return fmt.Errorf("image %s: %w", name, err)
		}
		args = append(args, "--kernel", filepath.Join(dir, "vmlinuz"), "--initrd", filepath.Join(dir, "initrd.img"),
			"--cmdline", strings.TrimSpace(string(cmdline)))
	}
	if _, err := l.CLI(ctx, args...); err != nil {
		return err
	}
	l.logf("imported image %s from %s", name, dir)
	return nil
}
