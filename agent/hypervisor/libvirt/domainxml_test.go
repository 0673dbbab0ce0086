package libvirt

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/hypervisor/hypervisortest"
	"github.com/minicloud/minicloud/pkg/nic"
)

func testSpec() hypervisor.DomainSpec {
	return hypervisor.DomainSpec{
		VMID: "0d5c1c3e-8a52-4d39-9a7e-3a1b2c3d4e5f", Name: "web", Project: "default",
		VCPUs: 2, MemoryMiB: 512, Hypervisor: hypervisor.TCG,
		DiskPath: "/var/lib/minicloud/vms/x/disk.qcow2", ConsoleLogPath: "/var/lib/minicloud/vms/x/console.log",
		NICs: []nic.NIC{{MAC: net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc}, TapName: "mct0d5c1c3e0", MTU: 1450}},
	}
}

// TestDomainXMLEscapesHostileText renders hostile names and parses the
// result back: the text comes back as text, and no element appears that the
// spec did not ask for.
func TestDomainXMLEscapesHostileText(t *testing.T) {
	for _, hostile := range hypervisortest.HostileNames {
		spec := testSpec()
		spec.Name, spec.Project = hostile, hostile
		spec.SMBIOS.Serial = hostile
		x, err := DomainXML(spec)
		if err != nil {
			t.Fatal(err)
		}
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(x); err != nil {
			t.Fatalf("rendered XML does not parse: %v\n%s", err, x)
		}
		if len(dom.Devices.Disks) != 1 || len(dom.Devices.Interfaces) != 1 || dom.Name != "mc-"+spec.VMID {
			t.Errorf("hostile text changed the structure:\n%s", x)
		}
		md, err := parseMetadata(stripNamespace(dom.Metadata.XML))
		if err != nil {
			t.Fatal(err)
		}
		// encoding/xml replaces characters XML cannot carry; everything
		// else must survive exactly.
		if md.Name != hostile || md.Project != hostile {
			t.Errorf("metadata round trip: got %q / %q, want %q", md.Name, md.Project, hostile)
		}
	}
}

// stripNamespace turns <instance xmlns="..."> into <instance>, as libvirt's
// DomainGetMetadata returns it.
func stripNamespace(s string) string {
	return strings.Replace(s, ` xmlns="`+MetadataNamespace+`"`, "", 1)
}

func TestDomainXMLShape(t *testing.T) {
	spec := testSpec()
	spec.Hypervisor = hypervisor.KVM
	spec.KernelPath, spec.InitrdPath, spec.Cmdline = "/k", "/i", "console=ttyS0"
	spec.ConfigDrivePath = "/cd.iso"
	x, err := DomainXML(spec)
	if err != nil {
		t.Fatal(err)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	if dom.Type != "kvm" || dom.CPU == nil || dom.CPU.Mode != "host-passthrough" {
		t.Errorf("kvm domain: type %q cpu %+v", dom.Type, dom.CPU)
	}
	if dom.OS.Kernel != "/k" || dom.OS.Initrd != "/i" || dom.OS.Cmdline != "console=ttyS0" || len(dom.OS.BootDevices) != 0 {
		t.Errorf("direct boot: %+v", dom.OS)
	}
	cd := dom.Devices.Disks[1]
	if cd.Device != "cdrom" || cd.ReadOnly == nil || cd.Source.File.File != "/cd.iso" {
		t.Errorf("config drive: %+v", cd)
	}
	n := dom.Devices.Interfaces[0]
	if n.Source.Ethernet == nil || n.Target.Managed != "no" || n.Model.Type != "virtio" || n.MTU.Size != 1450 {
		t.Errorf("nic: %+v", n)
	}
	if dom.Memory.Value != 512 || dom.Memory.Unit != "MiB" || dom.VCPU.Value != 2 {
		t.Errorf("sizing: %+v %+v", dom.Memory, dom.VCPU)
	}
	if dom.OnCrash != "destroy" {
		t.Errorf("on_crash %q", dom.OnCrash)
	}
}

// TestDomainXMLPassesLibvirtSchema has libvirtd check every shape DomainXML
// renders against its RNG schema (a define with DomainDefineValidate, then
// an undefine; nothing boots): Define no longer asks for that check on every
// create, so a field libvirt would ignore or misread is caught here instead.
func TestDomainXMLPassesLibvirtSchema(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (libvirt qemu:///system): run as root after hack/setup-host.sh")
	}
	if _, err := os.Stat(DefaultSocket); err != nil {
		t.Skipf("libvirtd not running (%v): run hack/setup-host.sh", err)
	}
	l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(DefaultSocket)))
	if err := l.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		t.Fatal(err)
	}
	defer l.Disconnect()

	withID := func(s hypervisor.DomainSpec) hypervisor.DomainSpec {
		s.VMID = uuid.NewString()
		s.SMBIOS.UUID = s.VMID
		return s
	}
	tcg := withID(testSpec())
	full := withID(testSpec())
	full.Hypervisor = hypervisor.KVM
	full.DiskFormat = "raw"
	full.KernelPath, full.InitrdPath, full.Cmdline = "/k", "/i", "console=ttyS0 root=/dev/vda"
	full.ConfigDrivePath = "/cd.iso"
	full.Epoch = 3
	full.SMBIOS = hypervisor.SMBIOS{Manufacturer: "minicloud", Product: "OpenStack Nova", Version: "minicloud",
		Serial: full.VMID, UUID: full.VMID, Family: "Virtual Machine"}
	full.NICs = append(full.NICs, nic.NIC{MAC: net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcd}, TapName: "mct0d5c1c3e1"})
	specs := map[string]hypervisor.DomainSpec{"tcg": tcg, "kvm, direct boot, config drive, two NICs": full}
	for i, hostile := range hypervisortest.HostileNames {
		s := withID(testSpec())
		s.Name, s.Project, s.SMBIOS.Serial = hostile, hostile, hostile
		specs[fmt.Sprintf("hostile name %d", i)] = s
	}
	for name, spec := range specs {
		x, err := DomainXML(spec)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		dom, err := l.DomainDefineXMLFlags(x, golibvirt.DomainDefineValidate)
		if err != nil {
			t.Errorf("%s: libvirt's schema rejects the rendered XML: %v\n%s", name, err, x)
			continue
		}
		if err := l.DomainUndefine(dom); err != nil {
			t.Errorf("%s: undefine: %v", name, err)
		}
	}
}
