// Package imageformattest makes real disk images with qemu-img for tests.
package imageformattest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// QemuImg runs `qemu-img create -q ARGS...` in dir and returns the bytes of
// the image it made (the second-to-last argument; the last is its size).
// It skips the test when qemu-img is not installed.
func QemuImg(t testing.TB, dir string, args ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	// A LUKS image makes qemu-img time PBKDF2 with the thread's CPU clock;
	// on a fast CPU its first 32768 iterations can take less than one tick
	// of that clock, and QEMU gives up ("Unable to get accurate CPU
	// usage"). That is the test machine's clock, not the image: try again.
	for attempt := 1; ; attempt++ {
		cmd := exec.Command("qemu-img", append([]string{"create", "-q"}, args...)...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err == nil {
			break
		}
		if attempt < 5 && strings.Contains(string(out), "Unable to get accurate CPU usage") {
			continue
		}
		t.Fatalf("qemu-img create %v: %v\n%s", args, err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, args[len(args)-2]))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
