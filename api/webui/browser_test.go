package webui_test

import (
	"crypto/rand"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
)

// TestBrowser clicks through the console in a real browser against a real
// cloud: `minicloudd all-in-one` (API, scheduler, agent with libvirt)
// booting the tiny image, serving the console on its web listener, and
// e2e/console.js driving Debian's chromium through Playwright. The script
// creates a VM from the form and sees its row reach RUNNING with no
// reload, reads its console log, deletes it, checks a bad name gets the
// API's message next to the field, and saves a screenshot of every page
// to api/webui/e2e/out (or $WEBUI_SCREENSHOTS). With WEBUI_DOCS_SHOTS=1
// they are also copied to docs/web/ for docs/web.md.
//
// Run it under the heavy lock: it boots a VM and a browser.
func TestBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("browser end-to-end test (boots a VM and a browser); skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (the all-in-one's agent creates bridges, taps and libvirt domains)")
	}
	root := cloudtest.RepoRoot()
	e2eDir := filepath.Join(root, "api/webui/e2e")
	chromium := "/usr/bin/chromium"
	for _, bin := range []string{chromium, "node", "npm"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is missing: hack/setup-host.sh installs it (%v)", bin, err)
		}
	}
	// playwright-core at the version package-lock.json pins; it downloads
	// no browser.
	if _, err := os.Stat(filepath.Join(e2eDir, "node_modules/playwright-core/package.json")); err != nil {
		npm := exec.Command("npm", "ci", "--no-audit", "--no-fund")
		npm.Dir = e2eDir
		if out, err := npm.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in %s: %v\n%s", e2eDir, err, out)
		}
	}

	images := cloudtest.TinyImage(t)
	cmdline, err := os.ReadFile(filepath.Join(images, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	c := cloudtest.Start(t)
	c.WaitHostUp()
	// A subnet of its own, so it cannot clash with `make up`'s network.
	octet, _ := rand.Int(rand.Reader, big.NewInt(200))
	c.MustMC("network", "create", "default", "--cidr", fmt.Sprintf("10.232.%d.0/24", octet.Int64()+20))
	c.MustMC("flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	c.MustMC("image", "create", "tiny", "--file", filepath.Join(images, "disk.qcow2"),
		"--kernel", filepath.Join(images, "vmlinuz"), "--initrd", filepath.Join(images, "initrd.img"),
		"--cmdline", strings.TrimSpace(string(cmdline)))
	// Whatever happens below, no VM outlives the test.
	t.Cleanup(func() {
		list, err := c.Client.VMs.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{})
		if err != nil {
			t.Errorf("list VMs for cleanup: %v", err)
			return
		}
		for _, vm := range list.GetVms() {
			if _, stderr, code := c.MC("vm", "delete", vm.GetMeta().GetName(), "--wait", "--timeout", "5m"); code != 0 {
				t.Errorf("cleanup: delete vm %s: %s", vm.GetMeta().GetName(), stderr)
			}
		}
	})

	// The message the API gives the CLI for a bad name.
	_, apiErr := c.Client.VMs.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "Bad_Name", Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}})
	if apiErr == nil {
		t.Fatal("the API accepted Bad_Name")
	}

	shots := os.Getenv("WEBUI_SCREENSHOTS")
	if shots == "" {
		shots = filepath.Join(e2eDir, "out")
	}
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	node := exec.Command("node", "console.js")
	node.Dir = e2eDir
	node.Env = append(os.Environ(),
		"MC_URL=https://"+c.Web,
		"MC_TOKEN="+c.AdminToken(),
		"MC_VM=webe2e",
		"MC_BAD_NAME=Bad_Name",
		"MC_BAD_NAME_ERROR="+apiErr.Error(),
		"MC_CONSOLE_EXPECT=MINICLOUD-TINY-SHELL",
		"MC_SHOTS="+shots,
		"CHROMIUM="+chromium,
	)
	out, err := node.CombinedOutput()
	t.Logf("console.js:\n%s", out)
	if err != nil {
		t.Fatalf("the browser test failed: %v\ncloud log:\n%s", err, c.Log())
	}
	// The VM is gone from the cloud, not just from the page.
	if _, err := c.Client.VMs.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "webe2e"}); err == nil {
		t.Fatal("webe2e still exists after the page deleted it")
	}
	t.Logf("screenshots in %s", shots)
	if os.Getenv("WEBUI_DOCS_SHOTS") == "1" {
		docs := filepath.Join(root, "docs/web")
		if err := os.MkdirAll(docs, 0o755); err != nil {
			t.Fatal(err)
		}
		files, _ := filepath.Glob(filepath.Join(shots, "*.png"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(docs, filepath.Base(f)), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
