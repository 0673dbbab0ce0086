package hypervisor_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/minicloud/minicloud/agent/hypervisor"
)

func TestReadConsoleTailSpansRotatedFiles(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "console.log")
	// virtlogd's rotation: console.log is newest, then .0, then .1.
	for name, content := range map[string]string{
		log + ".1": "oldest-",
		log + ".0": "older-",
		log:        "newest",
	} {
		if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		n    int64
		want string
	}{
		{3, "est"},
		{6, "newest"},
		{9, "er-newest"},
		{12, "older-newest"},
		{100, "oldest-older-newest"},
		{0, ""},
	} {
		got, err := hypervisor.ReadConsoleTail(log, c.n)
		if err != nil || string(got) != c.want {
			t.Errorf("ReadConsoleTail(%d) = %q, %v; want %q", c.n, got, err, c.want)
		}
	}
}

func TestReadConsoleTailOfMissingLogIsEmpty(t *testing.T) {
	got, err := hypervisor.ReadConsoleTail(filepath.Join(t.TempDir(), "console.log"), 100)
	if err != nil || len(got) != 0 {
		t.Errorf("got %q, %v; want empty", got, err)
	}
}

func TestReadConsoleTailJustRotated(t *testing.T) {
	// Between virtlogd's rename and its first write the newest file is
	// missing; the tail comes from the backup.
	log := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(log+".0", []byte("before rotation"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := hypervisor.ReadConsoleTail(log, 8)
	if err != nil || string(got) != "rotation" {
		t.Errorf("got %q, %v", got, err)
	}
}
