package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"
)

// The baseline: the domain XML of a VM minicloud created (`virsh dumpxml
// --inactive`), given a name, UUID, disk, tap, MAC and console file of its
// own, started with one createXML call (what `virsh create` does) on a
// libvirt connection opened before the clock starts. Disk overlays and taps
// are made before the clock starts too, so the baseline is libvirt and QEMU
// alone: timing `virsh create` itself added the start of a virsh process
// and its connection (20-30 ms here) to the raw side, which made the
// control plane look 4-6 % cheaper than it is.

func virsh(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", "qemu:///system", "-q"}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// diskInfo is what `qemu-img info --output=json` says about a disk.
type diskInfo struct {
	Format              string `json:"format"`
	VirtualSize         int64  `json:"virtual-size"`
	ActualSize          int64  `json:"actual-size"`
	BackingFilename     string `json:"backing-filename"`
	FullBackingFilename string `json:"full-backing-filename"`
	BackingFormat       string `json:"backing-filename-format"`
}

func qemuImgInfo(ctx context.Context, path, format string) (diskInfo, error) {
	// -U: the disk is open by a running QEMU. -f: qemu-img is never left
	// to guess a format (docs/security.md, "Untrusted images").
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "-f", format, "-U", "--output=json", path).Output()
	if err != nil {
		return diskInfo{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	var di diskInfo
	if err := json.Unmarshal(out, &di); err != nil {
		return diskInfo{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	return di, nil
}

// rawTemplate is the domain definition of a minicloud VM and its disk.
type rawTemplate struct {
	dom  libvirtxml.Domain
	disk diskInfo
}

// captureTemplate reads the definition of the domain of VM id from libvirt.
func captureTemplate(ctx context.Context, vmID, diskPath string) (*rawTemplate, error) {
	x, err := virsh(ctx, "dumpxml", "--inactive", "mc-"+vmID)
	if err != nil {
		return nil, err
	}
	t := &rawTemplate{}
	if err := t.dom.Unmarshal(x); err != nil {
		return nil, fmt.Errorf("parse domain XML of mc-%s: %w", vmID, err)
	}
	if t.disk, err = qemuImgInfo(ctx, diskPath, "qcow2"); err != nil {
		return nil, err
	}
	if t.disk.BackingFilename == "" {
		return nil, fmt.Errorf("disk %s of VM %s has no backing file: not an overlay", diskPath, vmID)
	}
	return t, nil
}

// rawDomain is one baseline domain, ready to be created.
type rawDomain struct {
	name, dir, tap, xml string
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// prepare makes domain i's overlay (over the same cached image), tap and XML
// under dir.
func (t *rawTemplate) prepare(ctx context.Context, dir string, i int) (rawDomain, error) {
	suffix := randomHex(4)
	d := rawDomain{
		name: fmt.Sprintf("agentbench-raw-%s-%d", suffix, i),
		tap:  "mcb" + suffix + fmt.Sprint(i%10), // <= 15 bytes, not the agent's "mct" prefix
	}
	d.dir = filepath.Join(dir, d.name)
	if err := os.MkdirAll(d.dir, 0o711); err != nil {
		return d, err
	}
	disk := filepath.Join(d.dir, "disk.qcow2")
	backing := t.disk.FullBackingFilename
	if backing == "" {
		backing = t.disk.BackingFilename
	}
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2",
		"-F", t.disk.BackingFormat, "-b", backing, disk, fmt.Sprint(t.disk.VirtualSize)).CombinedOutput(); err != nil {
		return d, fmt.Errorf("qemu-img create %s: %w: %s", disk, err, out)
	}
	// The agent's taps are persistent, single queue, with vnet_hdr, and
	// exist before the domain (managed='no'): the same here.
	if out, err := exec.CommandContext(ctx, "ip", "tuntap", "add", "dev", d.tap, "mode", "tap", "vnet_hdr").CombinedOutput(); err != nil {
		return d, fmt.Errorf("create tap %s: %w: %s", d.tap, err, out)
	}
	if out, err := exec.CommandContext(ctx, "ip", "link", "set", d.tap, "up").CombinedOutput(); err != nil {
		return d, fmt.Errorf("tap %s up: %w: %s", d.tap, err, out)
	}

	dom := t.dom // shallow copy: every slice below is replaced, not edited
	id := uuid.NewString()
	dom.Name, dom.UUID, dom.Metadata, dom.ID = d.name, id, nil, nil
	// SMBIOS must carry the domain's own UUID, or libvirt refuses it.
	dom.SysInfo = nil
	for _, si := range t.dom.SysInfo {
		if si.SMBIOS != nil && si.SMBIOS.System != nil {
			sm, sys := *si.SMBIOS, *si.SMBIOS.System
			sys.Entry = append([]libvirtxml.DomainSysInfoEntry(nil), sys.Entry...)
			for j := range sys.Entry {
				if sys.Entry[j].Name == "uuid" || sys.Entry[j].Name == "serial" {
					sys.Entry[j].Value = id
				}
			}
			sm.System = &sys
			si.SMBIOS = &sm
		}
		dom.SysInfo = append(dom.SysInfo, si)
	}
	devs := *t.dom.Devices
	dom.Devices = &devs
	devs.Disks = nil
	for _, dk := range t.dom.Devices.Disks {
		if dk.Device == "disk" && dk.Source != nil && dk.Source.File != nil {
			dk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: disk}}
			dk.BackingStore = nil
		}
		devs.Disks = append(devs.Disks, dk)
	}
	devs.Interfaces = nil
	for _, nic := range t.dom.Devices.Interfaces {
		nic.Target = &libvirtxml.DomainInterfaceTarget{Dev: d.tap, Managed: "no"}
		mac := net.HardwareAddr{0x52, 0x54, 0x00, 0, 0, 0}
		_, _ = rand.Read(mac[3:])
		nic.MAC = &libvirtxml.DomainInterfaceMAC{Address: mac.String()}
		devs.Interfaces = append(devs.Interfaces, nic)
	}
	consoleLog := filepath.Join(d.dir, "console.log")
	devs.Serials = nil
	for _, s := range t.dom.Devices.Serials {
		if s.Source != nil && s.Source.File != nil {
			f := *s.Source.File
			f.Path = consoleLog
			s.Source = &libvirtxml.DomainChardevSource{File: &f}
		}
		// A pty serial's log (the agent's console since b893800) is a
		// file in the VM's directory too.
		if s.Log != nil && s.Log.File != "" {
			s.Log = &libvirtxml.DomainChardevLog{File: consoleLog, Append: s.Log.Append}
		}
		devs.Serials = append(devs.Serials, s)
	}
	devs.Consoles = nil
	for _, c := range t.dom.Devices.Consoles {
		if c.Source != nil && c.Source.File != nil {
			f := *c.Source.File
			f.Path = consoleLog
			c.Source = &libvirtxml.DomainChardevSource{File: &f}
		}
		if c.Log != nil && c.Log.File != "" {
			c.Log = &libvirtxml.DomainChardevLog{File: consoleLog, Append: c.Log.Append}
		}
		devs.Consoles = append(devs.Consoles, c)
	}
	var err error
	if d.xml, err = dom.Marshal(); err != nil {
		return d, fmt.Errorf("marshal %s: %w", d.name, err)
	}
	return d, nil
}

// create is the measured call: createXML returns once QEMU runs the guest,
// as the agent's DomainCreate does.
func (d rawDomain) create(l *golibvirt.Libvirt) (time.Duration, error) {
	t0 := time.Now()
	_, err := l.DomainCreateXML(d.xml, 0)
	if err != nil {
		err = fmt.Errorf("create %s: %w", d.name, err)
	}
	return time.Since(t0), err
}

// dialLibvirt opens the baseline's connection to libvirtd (qemu:///system).
func dialLibvirt() (*golibvirt.Libvirt, error) {
	l := golibvirt.NewWithDialer(dialers.NewLocal())
	if err := l.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		return nil, fmt.Errorf("connect to libvirtd: %w", err)
	}
	return l, nil
}

// cleanup destroys the transient domain (which removes it) and deletes the
// tap and files, then checks that none of them is left.
func (d rawDomain) cleanup(ctx context.Context) error {
	gone, err := destroyDomain(ctx, d.name)
	_ = exec.CommandContext(ctx, "ip", "link", "del", d.tap).Run()
	os.RemoveAll(d.dir)
	if err != nil || !gone {
		return fmt.Errorf("raw domain %s: still exists (%v)", d.name, err)
	}
	if err := exec.CommandContext(ctx, "ip", "link", "show", d.tap).Run(); err == nil {
		return fmt.Errorf("tap %s still exists", d.tap)
	}
	return nil
}

// libvirtRestartWait is how long a check waits for libvirtd to come back:
// tests on this shared machine restart it.
const libvirtRestartWait = time.Minute

// domainExists asks libvirt whether a domain of that name exists. "I could
// not ask" is an error, never "no": while libvirtd restarts, virsh fails
// for every name, and its domains keep running.
func domainExists(ctx context.Context, name string) (bool, error) {
	deadline := time.Now().Add(libvirtRestartWait)
	for {
		out, err := virsh(ctx, "list", "--all", "--name")
		if err == nil {
			for _, n := range strings.Fields(out) {
				if n == name {
					return true, nil
				}
			}
			return false, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false, fmt.Errorf("libvirtd unreachable: %w", err)
		}
		time.Sleep(time.Second) // libvirtd restarting: no event to wait on
	}
}

// destroyDomain destroys a transient domain until libvirt no longer lists
// it; gone says whether it is.
func destroyDomain(ctx context.Context, name string) (gone bool, err error) {
	for attempt := 0; attempt < 3; attempt++ {
		exists, err := domainExists(ctx, name)
		if err != nil || !exists {
			return !exists && err == nil, err
		}
		_, _ = virsh(ctx, "destroy", name)
	}
	exists, err := domainExists(ctx, name)
	return !exists && err == nil, err
}

// runRawRepeated runs runRaw, repeating a batch that failed (on this shared
// machine: libvirtd restarted by a test); repeated counts the repeats.
func runRawRepeated(ctx context.Context, t *rawTemplate, dir string, n int, repeated *int) ([]time.Duration, error) {
	for attempt := 0; ; attempt++ {
		lat, err := runRaw(ctx, t, dir, n)
		if err == nil || attempt == maxRepeats || ctx.Err() != nil {
			return lat, err
		}
		*repeated++
		logf("raw batch failed, repeating it: %v", err)
	}
}

// runRaw creates n baseline domains at once and returns each one's latency.
func runRaw(ctx context.Context, t *rawTemplate, dir string, n int) (_ []time.Duration, err error) {
	doms := make([]rawDomain, 0, n)
	defer func() {
		for _, d := range doms {
			err = errors.Join(err, d.cleanup(context.WithoutCancel(ctx)))
		}
	}()
	for i := 0; i < n; i++ {
		d, err := t.prepare(ctx, dir, i)
		doms = append(doms, d)
		if err != nil {
			return nil, err
		}
	}
	l, err := dialLibvirt()
	if err != nil {
		return nil, err
	}
	defer l.Disconnect()
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range doms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat[i], errs[i] = doms[i].create(l)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return lat, nil
}
