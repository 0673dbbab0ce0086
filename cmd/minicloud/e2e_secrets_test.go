package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	netlinux "github.com/minicloud/minicloud/agent/network/linux"
	"github.com/minicloud/minicloud/agent/qemuaccess"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/cloudtest"
)

// TestE2ESecretsStaySecret (issue 11, section 4) boots the tiny guest with
// a canary string in its user-data through every component (API,
// scheduler, agent, metadata service, libvirt) with debug logging and the
// metrics pages on, takes it through its lifecycle, and then greps every
// log, every event of the VM, every metrics page and every CLI output for
// the canary: zero hits. On the way it walks the data directory (running,
// stopped, deleted) and fails on any file that a user other than its owner
// or QEMU's group can read.
func TestE2ESecretsStaySecret(t *testing.T) {
	skipShort(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root (the agent creates bridges, taps and libvirt domains)")
	}
	if _, err := os.Stat("/var/run/libvirt/libvirt-sock"); err != nil {
		t.Skip("libvirtd is not running (hack/setup-host.sh installs and starts it)")
	}
	images := cloudtest.TinyImage(t)
	cmdline, err := os.ReadFile(filepath.Join(images, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	qemu, err := qemuaccess.Detect(qemuaccess.ConfPath)
	if err != nil {
		t.Fatalf("QEMU's group: %v", err)
	}
	qemuGID, _ := qemu.GID()

	// Every secret the cloud is given. Add one line per new kind of secret
	// (a bearer token, once the API takes them): each is grepped for
	// everywhere below.
	userDataCanary := canary("userdata")
	canaries := map[string]string{
		"user-data": userDataCanary,
	}

	var bridge string
	t.Cleanup(func() {
		if bridge != "" {
			_ = netlinux.New().DeleteBridge(context.Background(), bridge)
		}
	})
	metrics := map[string]string{"api": freeAddr(t), "agent": freeAddr(t), "scheduler": freeAddr(t)}
	c := &cloud{Cloud: cloudtest.Start(t, "--log-level", "debug",
		"--metrics-listen", metrics["api"], "--agent-metrics-listen", metrics["agent"],
		"--scheduler-metrics-listen", metrics["scheduler"]), t: t, home: t.TempDir()}
	c.WaitHostUp()

	// Bearer tokens: the admin's (used by every CLI call below), a user's
	// used once, and a forged one that is refused (its secret must not
	// echo in the refusal).
	canaries["admin token"] = c.AdminToken()
	tess, err := c.Client.Auth.CreateUser(context.Background(), &minicloudv1.CreateUserRequest{Name: "tess", Project: "default", Role: "member"})
	if err != nil {
		t.Fatal(err)
	}
	canaries["user token"] = tess.Token
	secret := make([]byte, 16)
	_, _ = rand.Read(secret)
	forged := "mct_tess." + strings.Repeat("q", 8) + "." + hex.EncodeToString(secret)
	canaries["forged token"] = forged
	for token, wantErr := range map[string]bool{tess.Token: false, forged: true} {
		cl, err := client.Dial(context.Background(), c.Endpoint, c.DialOptionsWithToken(token)...)
		if err != nil {
			t.Fatal(err)
		}
		_, err = cl.VMs.ListVMs(context.Background(), &minicloudv1.ListVMsRequest{})
		cl.Close()
		if (err != nil) != wantErr {
			t.Fatalf("list VMs with a token (want error %v): %v", wantErr, err)
		}
	}

	// Everything the CLI printed, error messages included.
	var cliOut strings.Builder
	run := func(stdin string, args ...string) string {
		t.Helper()
		r := c.mcIn(stdin, args...)
		cliOut.WriteString(r.stdout + r.stderr)
		if r.code != 0 {
			t.Fatalf("minicloud %s: exit %d\nstderr: %s\nlog:\n%s", strings.Join(args, " "), r.code, r.stderr, c.Log())
		}
		return r.stdout
	}
	octet, _ := rand.Int(rand.Reader, big.NewInt(200))
	var nw struct{ Bridge string }
	decodeJSON(t, run("", "network", "create", "default", "--cidr", fmt.Sprintf("10.232.%d.0/24", octet.Int64()+20), "-o", "json"), &nw)
	bridge = nw.Bridge
	run("", "flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	run("", "image", "create", "tiny", "--file", filepath.Join(images, "disk.qcow2"),
		"--kernel", filepath.Join(images, "vmlinuz"), "--initrd", filepath.Join(images, "initrd.img"),
		"--cmdline", strings.TrimSpace(string(cmdline)))
	t.Cleanup(func() { c.mc("vm", "delete", "secret", "--wait", "--timeout", "5m") })

	userData := "#cloud-config\nwrite_files:\n- path: /etc/canary\n  content: " + userDataCanary + "\n"
	var vm struct{ Meta struct{ Id string } }
	decodeJSON(t, run(userData, "vm", "create", "secret", "--image", "tiny", "--flavor", "tiny",
		"--user-data", "-", "--config-drive", "--wait", "--timeout", "10m", "-o", "json"), &vm)
	run("", "vm", "wait", "secret", "--for", "ready", "--timeout", "10m")
	// The console is the guest's own output (the tiny guest prints its
	// config drive there), readable by its project: not a haystack.
	if r := c.mc("vm", "console-log", "secret"); r.code != 0 || !strings.Contains(r.stdout, userDataCanary) {
		t.Fatalf("console log of a guest that prints its user-data: exit %d, %d bytes: %s", r.code, len(r.stdout), r.stderr)
	}

	// The secret did reach the host, where it must: the guest's config
	// drive (so the checks below look where it could leak).
	iso := filepath.Join(c.DataDir, "agent", "vms", vm.Meta.Id, "config.iso")
	if b, err := os.ReadFile(iso); err != nil || !strings.Contains(string(b), userDataCanary) {
		t.Fatalf("the config drive %s does not carry the user-data (%v)", iso, err)
	}
	checkDataDirPrivate(t, c.DataDir, qemuGID, "running")

	run("", "vm", "stop", "secret")
	run("", "vm", "wait", "secret", "--for", "stopped", "--timeout", "5m")
	checkDataDirPrivate(t, c.DataDir, qemuGID, "stopped")
	run("", "vm", "start", "secret")
	run("", "vm", "wait", "secret", "--for", "running", "--timeout", "5m")
	run("", "vm", "show", "secret", "-o", "json")
	events := run("", "vm", "events", "secret", "-o", "json") + run("", "vm", "events", "secret")
	if !strings.Contains(events, "Created") {
		t.Fatalf("vm events:\n%s", events)
	}

	pages := map[string]string{}
	for name, addr := range metrics {
		path := "/metrics"
		pages[name+" metrics"] = httpGet(t, "http://"+addr+path)
	}
	run("", "vm", "delete", "secret", "--wait", "--timeout", "5m")
	checkDataDirPrivate(t, c.DataDir, qemuGID, "deleted")
	c.Stop() // flushes the last log lines

	log := c.Log()
	if !strings.Contains(log, "level=DEBUG") {
		t.Fatalf("the daemon did not log at debug level:\n%.2000s", log)
	}
	haystacks := map[string]string{
		"minicloudd log (API, scheduler, agent, metadata)": log,
		"VM events":    events,
		"CLI output":   cliOut.String(),
		"QEMU log":     readIfExists(t, "/var/log/libvirt/qemu/mc-"+vm.Meta.Id+".log"),
		"libvirtd log": journal(t),
	}
	for name, page := range pages {
		haystacks[name] = page
	}
	for where, text := range haystacks {
		t.Logf("grepping the %s: %d bytes", where, len(text))
	}
	for what, secret := range canaries {
		for where, text := range haystacks {
			if n := strings.Count(text, secret); n > 0 {
				i := strings.Index(text, secret)
				t.Errorf("the %s canary appears %d times in the %s, e.g. %q", what, n, where, text[max(0, i-200):min(len(text), i+len(secret)+50)])
			}
		}
	}
}

// canary is a string that appears nowhere unless a secret carrying it leaks.
func canary(kind string) string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "mc-canary-" + kind + "-" + hex.EncodeToString(b)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	cl := &http.Client{Timeout: 10 * time.Second}
	resp, err := cl.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK || len(b) == 0 {
		t.Fatalf("GET %s: %s, %d bytes, %v", url, resp.Status, len(b), err)
	}
	return string(b)
}

func readIfExists(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

// journal is libvirtd's recent log, where the system keeps one.
func journal(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("journalctl", "-u", "libvirtd", "--since", "-30min", "--no-pager").Output()
	if err != nil {
		return ""
	}
	return string(out)
}

// publicFiles may be read by anyone: the cluster CA's certificate.
var publicFiles = map[string]bool{"ca.crt": true}

// checkDataDirPrivate walks a data directory and fails on any file or
// directory another local user could read, write or (beyond QEMU's group)
// traverse: group bits are allowed only for QEMU's group, and there only
// read (files) or search (directories).
func checkDataDirPrivate(t *testing.T, dir string, qemuGID int, when string) {
	t.Helper()
	seen := 0
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil // removed while walking (a temporary file)
			}
			return err
		}
		fi, err := d.Info()
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		m := fi.Mode().Perm()
		rel, _ := filepath.Rel(dir, path)
		bad := ""
		switch {
		case fi.Mode()&fs.ModeSocket != 0:
			// Reachable only through its directory, checked as a directory.
		case d.IsDir():
			switch {
			case m&0o007 != 0:
				bad = "other users may list or enter it"
			case m&0o060 != 0:
				bad = "its group may list or change it"
			case m&0o010 != 0 && int(st.Gid) != qemuGID:
				bad = fmt.Sprintf("group %d, not QEMU's (%d), may enter it", st.Gid, qemuGID)
			}
		case fi.Mode().IsRegular():
			seen++
			switch {
			case publicFiles[rel]:
			case m&0o007 != 0:
				bad = "other users may read or write it"
			case m&0o030 != 0:
				bad = "its group may write or execute it"
			case m&0o040 != 0 && int(st.Gid) != qemuGID:
				bad = fmt.Sprintf("group %d, not QEMU's (%d), may read it", st.Gid, qemuGID)
			}
		}
		if bad != "" {
			t.Errorf("%s: %s (mode %v, uid %d, gid %d): %s", when, rel, m, st.Uid, st.Gid, bad)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	if seen == 0 {
		t.Fatalf("%s: no files under %s", when, dir)
	}
	t.Logf("%s: %d files under the data directory checked", when, seen)
}
