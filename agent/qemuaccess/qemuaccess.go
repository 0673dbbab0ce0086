// Package qemuaccess decides who, besides root, may open the files under an
// agent's data directory: QEMU, and no other local user.
//
// QEMU runs as an unprivileged user (Debian: libvirt-qemu) and opens VM
// disks, config drives, kernels, initrds and their backing images by path.
// libvirt's DAC driver (dynamic_ownership = 1, the default) chowns each of
// a domain's own files to that user while it runs, so those can stay 0600.
// What QEMU must still be able to do on its own is traverse the
// directories down to them, and read the shared image cache. Both are
// granted to QEMU's group only: directories 0710 and shared files 0640,
// group-owned by QEMU's group. Every other user gets nothing, not even
// directory traversal (before issue 11 directories were 0711 and cached
// images and config drives, which carry user-data, 0644).
package qemuaccess

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
)

// ConfPath is libvirt's QEMU driver configuration, which names QEMU's user
// and group.
const ConfPath = "/etc/libvirt/qemu.conf"

// defaultGroups are the groups distributions build libvirt's QEMU driver
// with, tried in order when qemu.conf does not name one: Debian and Ubuntu,
// then Fedora and RHEL.
var defaultGroups = []string{"libvirt-qemu", "qemu"}

// Access grants QEMU what it needs under a data directory. The zero value
// grants nothing beyond root (group root): right where no QEMU runs.
type Access struct {
	gid int
	// world is the fallback when QEMU's group is unknown: directories 0711
	// and shared files 0644, as before issue 11, so VMs still start.
	world bool
}

// ForGroup grants access to the group gid.
func ForGroup(gid int) Access { return Access{gid: gid} }

// World is the fallback for a host whose QEMU group cannot be found:
// directories traversable and shared files readable by every user.
func World() Access { return Access{world: true} }

// Detect reads QEMU's group from libvirt's configuration at conf. A missing
// file means no libvirt QEMU driver here: root only. An error means there is
// one but its group cannot be resolved; the caller decides (World keeps VMs
// working, at the price of other users reading the cache).
func Detect(conf string) (Access, error) {
	f, err := os.Open(conf)
	if errors.Is(err, os.ErrNotExist) {
		return Access{}, nil
	}
	if err != nil {
		return Access{}, fmt.Errorf("read QEMU's group: %w", err)
	}
	defer f.Close()
	name := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok && strings.TrimSpace(k) == "group" {
			name = strings.Trim(strings.TrimSpace(v), `"`)
		}
	}
	if err := sc.Err(); err != nil {
		return Access{}, fmt.Errorf("read QEMU's group from %s: %w", conf, err)
	}
	if name != "" {
		gid, err := lookupGroup(name)
		if err != nil {
			return Access{}, fmt.Errorf("QEMU's group %q (%s): %w", name, conf, err)
		}
		return ForGroup(gid), nil
	}
	for _, g := range defaultGroups {
		if gid, err := lookupGroup(g); err == nil {
			return ForGroup(gid), nil
		}
	}
	return Access{}, fmt.Errorf("%s names no QEMU group and none of %s exists", conf, strings.Join(defaultGroups, ", "))
}

// lookupGroup resolves a group as libvirt does: "+N" is a numeric id.
func lookupGroup(name string) (int, error) {
	if n, ok := strings.CutPrefix(name, "+"); ok {
		return strconv.Atoi(n)
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}

// GID is the group given access, and false for the World fallback.
func (a Access) GID() (int, bool) { return a.gid, !a.world }

// DirMode is the mode of a directory QEMU traverses.
func (a Access) DirMode() os.FileMode {
	if a.world {
		return 0o711
	}
	return 0o710
}

// FileMode is the mode of a file QEMU reads without libvirt handing it over.
func (a Access) FileMode() os.FileMode {
	if a.world {
		return 0o644
	}
	return 0o640
}

// MkdirAll creates dir and any missing parents and gives dir itself (not
// the parents) DirMode and QEMU's group, even when it already existed with
// another mode: a data directory made by an older version is tightened.
func (a Access) MkdirAll(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return a.set(dir, a.DirMode())
}

// ShareFile gives an existing file FileMode and QEMU's group.
func (a Access) ShareFile(path string) error { return a.set(path, a.FileMode()) }

func (a Access) set(path string, mode os.FileMode) error {
	// Group root needs no chown (root makes these files) and a non-root
	// test could not do it.
	if !a.world && (a.gid != 0 || os.Geteuid() == 0) {
		if err := os.Lchown(path, -1, a.gid); err != nil {
			return fmt.Errorf("give %s to QEMU's group: %w", path, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", filepath.Clean(path), err)
	}
	return nil
}
