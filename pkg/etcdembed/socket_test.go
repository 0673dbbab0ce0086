package etcdembed_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/minicloud/minicloud/pkg/etcdembed"
)

// TestSocketOnlyRootConnects starts etcd on a unix socket, as the
// all-in-one does, and checks that it is the only door: no TCP listener
// (client or peer), the socket's directory is 0700, root's client works and
// an unprivileged user's connection attempt is refused by the kernel.
func TestSocketOnlyRootConnects(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test connects as root and as nobody")
	}
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl not installed")
	}
	// Every directory above the socket's is open to all (t.TempDir's parent
	// is not), so the socket's own directory must be the barrier.
	top, err := os.MkdirTemp("/var/tmp", "etcdsock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	if err := os.Chmod(top, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(top, "run", "etcd.sock")
	s, err := etcdembed.Start(context.Background(), etcdembed.Config{Dir: filepath.Join(top, "etcd"), Socket: sock, Quiet: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if want := "unix://" + sock; s.Endpoint != want {
		t.Fatalf("endpoint %q, want %q", s.Endpoint, want)
	}
	for _, a := range s.ListenAddrs() {
		if a.Network() != "unix" {
			t.Errorf("embedded etcd listens on %s %s", a.Network(), a)
		}
	}
	fi, err := os.Stat(filepath.Dir(sock))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v, want 0700", fi.Mode().Perm())
	}

	c, err := s.Client()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Put(context.Background(), "/k", "v"); err != nil {
		t.Fatalf("root's client: %v", err)
	}

	get := func(cred *syscall.Credential) (string, error) {
		cmd := exec.Command(curl, "-sS", "--max-time", "10", "--unix-socket", sock, "http://localhost/version")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// The control: the same request as root gets etcd's answer.
	if out, err := get(nil); err != nil || !strings.Contains(out, "etcdserver") {
		t.Fatalf("root: curl %v: %s", err, out)
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	if out, err := get(nobody); err == nil || strings.Contains(out, "etcdserver") {
		t.Fatalf("an unprivileged user reached etcd: %s", out)
	}
	// The probe itself works as nobody once the permissions allow it: the
	// refusal above is the permissions', not a broken probe's.
	if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o777); err != nil {
		t.Fatal(err)
	}
	if out, err := get(nobody); err != nil || !strings.Contains(out, "etcdserver") {
		t.Fatalf("nobody with an open socket: curl %v: %s", err, out)
	}
}
