package configdrive

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kdomanski/iso9660"
	"sigs.k8s.io/yaml"

	"github.com/minicloud/minicloud/metadata"
)

func testInstance() *metadata.Instance {
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	return &metadata.Instance{
		ID: "1a2b3c4d-0000-4000-8000-000000000001", Name: "web1", Hostname: "web1", Domain: metadata.DefaultDomain,
		Project: "p1", AvailabilityZone: "zone-a", Region: "zone", InstanceType: "small", Image: "debian-12",
		Interfaces: []metadata.Interface{{Bridge: "mc-test", Network: "default", MAC: mac,
			Address: netip.MustParsePrefix("10.0.0.5/24"), Gateway: netip.MustParseAddr("10.0.0.1"), MTU: 1500,
			TapName: "mct1a2b3c4d0"}},
		SSHKeys:  []metadata.SSHKey{{Name: "alice", Key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl5Y2hEY9+0XnH8cS4Pn1Mo9h3KxG8nKJ9YVtq9GkR2 alice"}},
		UserData: []byte("#cloud-config\nruncmd: [touch /tmp/ok]\n"),
	}
}

// readISO reads every file of an image back with the library's reader.
func readISO(t *testing.T, img []byte) (string, map[string][]byte) {
	t.Helper()
	im, err := iso9660.OpenImage(bytes.NewReader(img))
	if err != nil {
		t.Fatalf("open image: %v", err)
	}
	label, err := im.Label()
	if err != nil {
		t.Fatal(err)
	}
	root, err := im.RootDir()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	var walk func(prefix string, f *iso9660.File)
	walk = func(prefix string, f *iso9660.File) {
		kids, err := f.GetChildren()
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range kids {
			p := strings.TrimPrefix(prefix+"/"+k.Name(), "/")
			if k.IsDir() {
				walk(p, k)
				continue
			}
			b, err := io.ReadAll(k.Reader())
			if err != nil {
				t.Fatal(err)
			}
			files[p] = b
		}
	}
	walk("", root)
	return strings.TrimRight(label, " "), files
}

func TestBuildConfigDrive2(t *testing.T) {
	inst := testInstance()
	var buf bytes.Buffer
	if err := Build(&buf, inst, ConfigDrive2); err != nil {
		t.Fatal(err)
	}
	label, files := readISO(t, buf.Bytes())
	if label != "config-2" {
		t.Errorf("label %q", label)
	}
	for _, p := range []string{
		"openstack/latest/meta_data.json", "openstack/latest/network_data.json", "openstack/latest/user_data",
		"openstack/latest/vendor_data.json", "openstack/latest/vendor_data2.json",
		"openstack/2018-08-27/meta_data.json", "openstack/2012-08-10/meta_data.json",
		"ec2/latest/meta-data.json", "ec2/2009-04-04/meta-data.json", "ec2/latest/user-data",
	} {
		if _, ok := files[p]; !ok {
			t.Errorf("missing %s (have %v)", p, keys(files))
		}
	}
	if string(files["openstack/latest/user_data"]) != string(inst.UserData) {
		t.Errorf("user_data = %q", files["openstack/latest/user_data"])
	}
	var md map[string]any
	if err := json.Unmarshal(files["openstack/latest/meta_data.json"], &md); err != nil || md["uuid"] != inst.ID || md["hostname"] != "web1" {
		t.Errorf("meta_data.json = %v (%v)", md, err)
	}
	var ec2 map[string]any
	if err := json.Unmarshal(files["ec2/latest/meta-data.json"], &ec2); err != nil || ec2["instance-id"] != inst.ID || ec2["local-ipv4"] != "10.0.0.5" {
		t.Errorf("ec2 meta-data.json = %v (%v)", ec2, err)
	}
}

func TestBuildNoCloud(t *testing.T) {
	inst := testInstance()
	var buf bytes.Buffer
	if err := Build(&buf, inst, NoCloud); err != nil {
		t.Fatal(err)
	}
	label, files := readISO(t, buf.Bytes())
	if label != "cidata" {
		t.Errorf("label %q", label)
	}
	var md map[string]any
	if err := yaml.Unmarshal(files["meta-data"], &md); err != nil || md["instance-id"] != inst.ID || md["local-hostname"] != "web1" {
		t.Errorf("meta-data = %s (%v)", files["meta-data"], err)
	}
	if string(files["user-data"]) != string(inst.UserData) {
		t.Errorf("user-data = %q", files["user-data"])
	}
	var nc struct {
		Version   int `json:"version"`
		Ethernets map[string]struct {
			Match     map[string]string `json:"match"`
			DHCP4     bool              `json:"dhcp4"`
			Addresses []string          `json:"addresses"`
		} `json:"ethernets"`
	}
	if err := yaml.Unmarshal(files["network-config"], &nc); err != nil || nc.Version != 2 ||
		nc.Ethernets["eth0"].Match["macaddress"] != "52:54:00:12:34:56" || !nc.Ethernets["eth0"].DHCP4 || len(nc.Ethernets["eth0"].Addresses) != 0 {
		t.Errorf("network-config = %s (%v)", files["network-config"], err)
	}
}

// TestMountedNamesSurvive mounts the images with the kernel's isofs, as
// cloud-init does, and reads the lower-case paths cloud-init reads.
func TestMountedNamesSurvive(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a loop device needs root")
	}
	if !kernelHasISO9660() {
		t.Skip("this kernel has no iso9660 filesystem (no isofs module); TestISOInfoNames checks the names instead")
	}
	inst := testInstance()
	for _, layout := range []Layout{ConfigDrive2, NoCloud} {
		t.Run(string(layout), func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "drive.iso")
			if err := WriteFile(img, inst, layout); err != nil {
				t.Fatal(err)
			}
			mnt := filepath.Join(dir, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("mount", "-o", "loop,ro", "-t", "iso9660", img, mnt).CombinedOutput(); err != nil {
				t.Fatalf("mount: %v: %s", err, out)
			}
			t.Cleanup(func() {
				if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
					t.Errorf("umount: %v: %s", err, out)
				}
			})
			want, err := Files(inst, layout)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range want {
				got, err := os.ReadFile(filepath.Join(mnt, f.Name))
				if err != nil {
					t.Errorf("read %s from the mounted image: %v", f.Name, err)
					continue
				}
				// random_seed differs between renders; compare the rest.
				if !strings.HasSuffix(f.Name, "meta_data.json") && !bytes.Equal(got, f.Body) {
					t.Errorf("%s = %q, want %q", f.Name, got, f.Body)
				}
			}
			if path, err := exec.LookPath("isoinfo"); err == nil {
				out, err := exec.Command(path, "-d", "-i", img).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "Volume id: "+layout.Label()) {
					t.Errorf("isoinfo -d: %v: %s", err, out)
				}
			}
		})
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "drive.iso")
	if err := os.WriteFile(img, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := testInstance()
	bad.ID = "nope"
	if err := WriteFile(img, bad, ConfigDrive2); err == nil {
		t.Fatal("invalid instance accepted")
	}
	if b, _ := os.ReadFile(img); string(b) != "old" {
		t.Fatal("failed build replaced the old image")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
	if err := WriteFile(img, testInstance(), ConfigDrive2); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(img); len(b) < 32*1024 {
		t.Fatalf("image of %d bytes", len(b))
	}
	// It carries user-data: its owner's only (libvirt hands it to QEMU).
	if st, _ := os.Stat(img); st.Mode().Perm() != 0o600 {
		t.Errorf("config drive mode %v, want 0600", st.Mode().Perm())
	}
}

func TestParseLayoutAndNames(t *testing.T) {
	for in, want := range map[string]Layout{"": ConfigDrive2, "config-2": ConfigDrive2, "cidata": NoCloud} {
		if got, err := ParseLayout(in); err != nil || got != want {
			t.Errorf("ParseLayout(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseLayout("vfat"); err == nil {
		t.Error("unknown layout accepted")
	}
	for _, bad := range []string{"Meta", "a b", "x/y.z/w", "a.b.c", strings.Repeat("a", 29), "a//b"} {
		if checkName(bad) == nil {
			t.Errorf("checkName(%q) accepted a name ISO 9660 would change", bad)
		}
	}
}

func kernelHasISO9660() bool {
	_ = exec.Command("modprobe", "isofs").Run()
	b, err := os.ReadFile("/proc/filesystems")
	return err == nil && strings.Contains(string(b), "iso9660")
}

// TestISOInfoNames lists the images with genisoimage's isoinfo, an
// independent reader: every path must be stored lower-case and unmangled
// (Linux then shows it without the ";1" version, as cloud-init reads it).
func TestISOInfoNames(t *testing.T) {
	isoinfo, err := exec.LookPath("isoinfo")
	if err != nil {
		t.Skip("isoinfo not installed (apt-get install genisoimage)")
	}
	inst := testInstance()
	for _, layout := range []Layout{ConfigDrive2, NoCloud} {
		img := filepath.Join(t.TempDir(), "drive.iso")
		if err := WriteFile(img, inst, layout); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(isoinfo, "-d", "-i", img).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Volume id: "+layout.Label()+"\n") {
			t.Errorf("isoinfo -d: %v: %s", err, out)
		}
		out, err = exec.Command(isoinfo, "-f", "-i", img).CombinedOutput()
		if err != nil {
			t.Fatalf("isoinfo -f: %v: %s", err, out)
		}
		listed := map[string]bool{}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			listed[l] = true
		}
		files, err := Files(inst, layout)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if !listed["/"+f.Name+";1"] {
				t.Errorf("%s: %s not stored as %q; isoinfo lists:\n%s", layout, f.Name, "/"+f.Name+";1", out)
			}
		}
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
