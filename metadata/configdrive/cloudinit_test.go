package configdrive

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/metadata/internal/cloudinittest"
)

// unpack writes an image's files into a directory under the names the
// library reads back (Linux's isofs shows the same names: lower case, no
// ";1"), standing in for the mount where the kernel has no isofs.
func unpack(t *testing.T, img []byte) string {
	t.Helper()
	_, files := readISO(t, img)
	dir := t.TempDir()
	for name, body := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestCloudInitReadsDrives: cloud-init 22.4's ConfigDriveReader and its
// NoCloud seed reader take our images' files as they are.
func TestCloudInitReadsDrives(t *testing.T) {
	inst := testInstance()
	for _, layout := range []Layout{ConfigDrive2, NoCloud} {
		var buf bytes.Buffer
		if err := Build(&buf, inst, layout); err != nil {
			t.Fatal(err)
		}
		dir := unpack(t, buf.Bytes())
		out, err := cloudinittest.Command(t, string(layout), dir).Output()
		if err != nil {
			t.Fatalf("%s: cloud-init: %v: %s", layout, err, cloudinittest.Stderr(err))
		}
		var got map[string]any
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("%s: %v: %s", layout, err, out)
		}
		switch layout {
		case ConfigDrive2:
			osd, _ := got["openstack"].(map[string]any)
			md, _ := osd["metadata"].(map[string]any)
			ec2, _ := osd["ec2-metadata"].(map[string]any)
			if md["uuid"] != inst.ID || osd["userdata"] != string(inst.UserData) || ec2["instance-id"] != inst.ID {
				t.Errorf("config-2 as cloud-init reads it: %s", out)
			}
			if !strings.Contains(string(out), `"type": "dhcp4"`) || strings.Contains(string(out), `"static"`) {
				t.Errorf("config-2 network config is not DHCP: %s", out)
			}
		case NoCloud:
			md, _ := got["meta-data"].(map[string]any)
			nc, _ := got["network-config"].(map[string]any)
			if md["instance-id"] != inst.ID || md["local-hostname"] != "web1" || got["user-data"] != string(inst.UserData) || nc["version"] != float64(2) {
				t.Errorf("cidata as cloud-init reads it: %s", out)
			}
			eths, _ := nc["ethernets"].(map[string]any)
			if eth0, _ := eths["eth0"].(map[string]any); eth0["dhcp4"] != true || eth0["addresses"] != nil || eth0["routes"] != nil {
				t.Errorf("cidata network-config is not DHCP: %s", out)
			}
		}
	}
}
