package configdrive

import (
	"bytes"
	"testing"
)

// FuzzBuild builds images from arbitrary hostnames, user-data and labels:
// the builder either refuses or writes an image that reads back with the
// same user-data in both layouts.
func FuzzBuild(f *testing.F) {
	f.Add("web1", []byte("#cloud-config\n"), "role", "web", "#cloud-config\npackages: [htop]\n")
	f.Add("", []byte{}, "", "", "")
	f.Add("h\x00st", []byte{0xff, 0xfe, 0x00}, "a/b", "\"quoted\"\n", "\x00")
	f.Fuzz(func(t *testing.T, hostname string, userData []byte, labelKey, labelValue, vendor string) {
		inst := testInstance()
		inst.Hostname = hostname
		inst.UserData = userData
		inst.Labels = map[string]string{labelKey: labelValue}
		inst.VendorData = []byte(vendor)
		for _, layout := range []Layout{ConfigDrive2, NoCloud} {
			var buf bytes.Buffer
			if err := Build(&buf, inst, layout); err != nil {
				t.Fatalf("%s: %v", layout, err)
			}
			_, files := readISO(t, buf.Bytes())
			name := "openstack/latest/user_data"
			if layout == NoCloud {
				name = "user-data"
			}
			if !bytes.Equal(files[name], userData) {
				t.Fatalf("%s: %s = %q, want %q", layout, name, files[name], userData)
			}
		}
	})
}
