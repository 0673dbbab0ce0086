package lab

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Leftovers lists what of the lab is still on the machine after Down:
// its directory, namespaces, links, mounts, processes, and the cgroups of
// the VMs ids and domains of theirs in the machine's own libvirt (which
// never should have seen them). Tests and benchmarks check it is empty.
func (l *Lab) Leftovers(ids []string) []string {
	var out []string
	if _, err := os.Stat(l.Dir); err == nil {
		out = append(out, "directory "+l.Dir)
	}
	if b, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(b), l.Name+"-") {
		out = append(out, "network namespaces: "+strings.TrimSpace(string(b)))
	}
	if b, _ := exec.Command("ip", "-o", "link", "show").Output(); strings.Contains(string(b), ": "+l.Name) {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, ": "+l.Name) {
				out = append(out, "link "+line)
			}
		}
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), "minicloud-lab-"+l.Name) {
		out = append(out, "mounts under /run/minicloud-lab-"+l.Name)
	}
	if _, err := os.Stat("/run/minicloud-lab-" + l.Name); err == nil {
		out = append(out, "directory /run/minicloud-lab-"+l.Name)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), l.Dir) {
			out = append(out, "process "+p+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	for _, id := range ids {
		if m, _ := filepath.Glob("/sys/fs/cgroup/*/machine/qemu-*-mc-" + id + ".libvirt-qemu"); len(m) > 0 {
			out = append(out, "cgroups "+strings.Join(m, " "))
		}
		// The machine's own libvirtd never saw the lab's domains.
		if err := exec.Command("virsh", "-c", "qemu:///system", "dominfo", "mc-"+id).Run(); err == nil {
			out = append(out, "domain mc-"+id+" in the machine's libvirt")
		}
	}
	return out
}
