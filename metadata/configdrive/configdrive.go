// Package configdrive builds read-only ISO 9660 images that carry an
// instance's metadata for guests that must not depend on the network: the
// OpenStack "config-2" layout and cloud-init's NoCloud "cidata" layout. The
// documents come from the same renderers as the HTTP metadata trees, so a
// guest reads the same thing from either.
//
// Images are written with github.com/kdomanski/iso9660, which writes plain
// ISO 9660 (no Rock Ridge, no Joliet) and lower-cases names; Linux shows
// such names lower-case without their ";1" version, which is what
// cloud-init reads. The library replaces any byte outside its character set
// and truncates long names, so every path is checked to come through
// unchanged before anything is written.
package configdrive

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/kdomanski/iso9660"

	"github.com/minicloud/minicloud/metadata"
)

// Layout is the on-disk format of a config drive.
type Layout string

const (
	// ConfigDrive2 is OpenStack's layout (volume label "config-2").
	ConfigDrive2 Layout = "config-2"
	// NoCloud is cloud-init's NoCloud seed (volume label "cidata").
	NoCloud Layout = "cidata"
)

// ParseLayout maps VMSpec.config_drive_format to a Layout ("" is
// config-2).
func ParseLayout(s string) (Layout, error) {
	switch s {
	case "", string(ConfigDrive2):
		return ConfigDrive2, nil
	case string(NoCloud):
		return NoCloud, nil
	}
	return "", fmt.Errorf("config drive format %q: want %q or %q", s, ConfigDrive2, NoCloud)
}

// Label is the volume label cloud-init looks for.
func (l Layout) Label() string { return string(l) }

// Files renders the image's files (path → content) for inst in layout.
func Files(inst *metadata.Instance, layout Layout) ([]metadata.File, error) {
	if err := inst.Validate(); err != nil {
		return nil, err
	}
	switch layout {
	case NoCloud:
		return metadata.NoCloudFiles(inst)
	case ConfigDrive2:
		return configDrive2Files(inst)
	}
	return nil, fmt.Errorf("unknown config drive layout %q", layout)
}

// configDrive2Files lays out what Nova writes: every OpenStack version
// directory plus latest, and the EC2 meta-data as one JSON document.
func configDrive2Files(inst *metadata.Instance) ([]metadata.File, error) {
	var out []metadata.File
	for _, v := range append(append([]string(nil), metadata.OpenStackVersions...), "latest") {
		files, err := metadata.OpenStackFiles(inst, v)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			out = append(out, metadata.File{Name: path.Join("openstack", v, f.Name), Body: f.Body})
		}
	}
	ec2, err := metadata.EC2MetaDataJSON(inst)
	if err != nil {
		return nil, err
	}
	for _, v := range []string{"2009-04-04", "latest"} {
		out = append(out, metadata.File{Name: path.Join("ec2", v, "meta-data.json"), Body: ec2})
		if inst.UserData != nil {
			out = append(out, metadata.File{Name: path.Join("ec2", v, "user-data"), Body: inst.UserData})
		}
	}
	return out, nil
}

// checkName refuses a path the ISO writer would change: Linux must show it
// back exactly as cloud-init asks for it.
func checkName(p string) error {
	segs := strings.Split(p, "/")
	for i, s := range segs {
		limit := 31 // ECMA-119 7.6.3, directories
		if i == len(segs)-1 {
			limit = 30 - len(";1") // 7.5, files with their version
		}
		if s == "" || len(s) > limit || strings.Count(s, ".") > 1 || (i < len(segs)-1 && strings.Contains(s, ".")) {
			return fmt.Errorf("config drive path %q: %q cannot be stored unchanged in ISO 9660", p, s)
		}
		for _, r := range s {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
				return fmt.Errorf("config drive path %q: %q has %q, which ISO 9660 would mangle", p, s, r)
			}
		}
	}
	return nil
}

// Build writes the config drive image of inst to w.
func Build(w io.Writer, inst *metadata.Instance, layout Layout) error {
	files, err := Files(inst, layout)
	if err != nil {
		return fmt.Errorf("config drive for %s: %w", inst.ID, err)
	}
	iw, err := iso9660.NewWriter()
	if err != nil {
		return fmt.Errorf("config drive for %s: staging: %w", inst.ID, err)
	}
	defer iw.Cleanup()
	for _, f := range files {
		if err := checkName(f.Name); err != nil {
			return err
		}
		if err := iw.AddFile(bytes.NewReader(f.Body), f.Name); err != nil {
			return fmt.Errorf("config drive for %s: add %s: %w", inst.ID, f.Name, err)
		}
	}
	if err := iw.WriteTo(w, layout.Label()); err != nil {
		return fmt.Errorf("config drive for %s: write image: %w", inst.ID, err)
	}
	return nil
}

// WriteFile builds the image at path atomically: it is written to a
// temporary file in the same directory, synced and renamed, so a crash
// leaves either the old image or the new one, never half of one.
func WriteFile(path string, inst *metadata.Instance, layout Layout) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err = Build(tmp, inst, layout); err != nil {
		return err
	}
	// The image carries user-data (secrets): its owner only. libvirt hands
	// the file to QEMU's user while the domain runs.
	if err = tmp.Chmod(0o600); err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("config drive %s: sync: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
