// Package e2e holds the tests that run against the multi-host lab (package
// lab): one lab per test run, brought up by the first test that asks for it
// (Shared) and removed after the last, with a check that nothing is left.
// Every lab test of the repository belongs in this package, so `make test`
// boots the lab once.
package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/pkg/cloudtest"
)

// The test lab is named, placed and addressed apart from `make lab`'s, so
// a test run beside a lab someone uses disturbs neither. Two test runs at
// once (two worktrees) set MINICLOUD_LABTEST_NAME, _DIR and _SUBNET apart.
var (
	testLabName   = envOr("MINICLOUD_LABTEST_NAME", "mclt")
	testLabDir    = envOr("MINICLOUD_LABTEST_DIR", "/var/lib/minicloud-labtest")
	testLabSubnet = envOr("MINICLOUD_LABTEST_SUBNET", "10.251.0.0/24")
)

const testLabHosts = 3

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

var (
	sharedOnce sync.Once
	shared     *lab.Lab
	sharedErr  error
	// vmIDs are the lab's VM ids as the test saw them, so the leak check
	// can look for their domains and cgroups after the lab is gone.
	vmIDs []string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		ids := vmIDsOf(shared)
		if err := shared.Down(context.Background()); err != nil {
			fmt.Fprintln(os.Stderr, "lab down:", err)
			code = 1
		}
		if leaks := shared.Leftovers(ids); len(leaks) > 0 {
			fmt.Fprintf(os.Stderr, "the lab left behind:\n  %s\n", strings.Join(leaks, "\n  "))
			code = 1
		}
	}
	cloudtest.RemoveBinaries()
	os.Exit(code)
}

// Shared returns the test run's lab, bringing it up on first use:
// testLabHosts hosts, the control plane, images and flavors, and one tiny
// VM RUNNING on every host (lab.VMName(host)). Tests may add VMs and
// networks of their own (and should delete them); a test that stops,
// partitions or kills part of the lab puts it back before it ends. It
// skips without root or in -short mode.
func Shared(t *testing.T) *lab.Lab {
	t.Helper()
	if testing.Short() {
		t.Skip("lab tests boot a cluster; skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("lab tests need root (namespaces, bridges, libvirtd)")
	}
	for _, p := range []string{"/usr/bin/etcd", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/qemu-system-x86_64"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("%s missing (hack/setup-host.sh installs it)", p)
		}
	}
	sharedOnce.Do(func() {
		cli, _ := cloudtest.Binaries(t)
		tiny := cloudtest.TinyImage(t)
		// A lab left by a killed run: remove it first.
		if old, err := lab.Load(testLabDir, os.Stderr); err == nil {
			if err := old.Down(context.Background()); err != nil {
				sharedErr = fmt.Errorf("remove the lab of an earlier run: %w", err)
				return
			}
		}
		l, err := lab.New(lab.Config{
			Name: testLabName, Dir: testLabDir, Hosts: testLabHosts,
			Subnet: netip.MustParsePrefix(testLabSubnet), BinDir: filepath.Dir(cli), Images: map[string]string{"tiny": tiny},
		}, testLog{})
		if err != nil {
			sharedErr = err
			return
		}
		shared = l // from here on TestMain removes it, whatever happens
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		start := time.Now()
		if err := l.Up(ctx); err != nil {
			sharedErr = fmt.Errorf("lab up: %w", err)
			return
		}
		fmt.Fprintf(os.Stderr, "lab up in %s\n", time.Since(start).Round(time.Second))
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return shared
}

// testLog sends the lab's progress to stderr, where go test -v shows it.
type testLog struct{}

func (testLog) Write(p []byte) (int, error) { return os.Stderr.Write(p) }

func vmIDsOf(l *lab.Lab) []string {
	var ids []string
	for _, h := range l.HostNames() {
		ids = append(ids, l.VMIDs(h)...)
	}
	return append(ids, vmIDs...)
}
