package libvirt

import (
	"encoding/xml"
	"fmt"

	"libvirt.org/go/libvirtxml"

	"github.com/minicloud/minicloud/agent/hypervisor"
)

// MetadataNamespace is the XML namespace of the <metadata> element that marks
// a domain as minicloud's.
const MetadataNamespace = "https://minicloud.dev/xmlns/domain/1"

// metadataKey is the prefix libvirt uses when it prints our element.
const metadataKey = "minicloud"

// instanceMetadata is minicloud's element inside <metadata>. encoding/xml
// escapes every value, so a VM name such as `</name><devices>` stays text.
type instanceMetadata struct {
	XMLName    xml.Name `xml:"https://minicloud.dev/xmlns/domain/1 instance"`
	VMID       string   `xml:"vm-id"`
	Project    string   `xml:"project"`
	Name       string   `xml:"name"`
	Hypervisor string   `xml:"hypervisor"`
	Epoch      int64    `xml:"assignment-epoch,omitempty"`
}

// parseMetadata reads the element as DomainGetMetadata returns it: libvirt
// selects it by namespace and hands it back without one.
func parseMetadata(s string) (instanceMetadata, error) {
	var md struct {
		XMLName    xml.Name `xml:"instance"`
		VMID       string   `xml:"vm-id"`
		Project    string   `xml:"project"`
		Name       string   `xml:"name"`
		Hypervisor string   `xml:"hypervisor"`
		Epoch      int64    `xml:"assignment-epoch"`
	}
	if err := xml.Unmarshal([]byte(s), &md); err != nil {
		return instanceMetadata{}, fmt.Errorf("parse minicloud metadata: %w", err)
	}
	return instanceMetadata{VMID: md.VMID, Project: md.Project, Name: md.Name, Hypervisor: md.Hypervisor, Epoch: md.Epoch}, nil
}

// DomainXML renders spec as the libvirt domain XML that Define uses (exported
// for benchmarks that compare with raw virsh). Everything goes through
// libvirtxml's structs and encoding/xml; nothing is concatenated.
func DomainXML(spec hypervisor.DomainSpec) (string, error) {
	md, err := xml.Marshal(instanceMetadata{
		VMID: spec.VMID, Project: spec.Project, Name: spec.Name, Hypervisor: spec.Hypervisor, Epoch: spec.Epoch,
	})
	if err != nil {
		return "", fmt.Errorf("marshal metadata: %w", err)
	}
	domType := "kvm"
	if spec.Hypervisor == hypervisor.TCG {
		domType = "qemu"
	}
	diskFormat := spec.DiskFormat
	if diskFormat == "" {
		diskFormat = "qcow2"
	}

	os := &libvirtxml.DomainOS{
		Type:   &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "pc", Type: "hvm"},
		SMBios: &libvirtxml.DomainSMBios{Mode: "sysinfo"},
	}
	if spec.KernelPath != "" {
		os.Kernel, os.Initrd, os.Cmdline = spec.KernelPath, spec.InitrdPath, spec.Cmdline
	} else {
		os.BootDevices = []libvirtxml.DomainBootDevice{{Dev: "hd"}}
	}

	var cpu *libvirtxml.DomainCPU
	if domType == "kvm" {
		cpu = &libvirtxml.DomainCPU{Mode: "host-passthrough", Check: "none"}
	}

	sys := spec.SMBIOS
	sys.UUID = spec.VMID
	var entries []libvirtxml.DomainSysInfoEntry
	for _, e := range []struct{ name, value string }{
		{"manufacturer", sys.Manufacturer}, {"product", sys.Product}, {"version", sys.Version},
		{"serial", sys.Serial}, {"uuid", sys.UUID}, {"family", sys.Family},
	} {
		if e.value != "" {
			entries = append(entries, libvirtxml.DomainSysInfoEntry{Name: e.name, Value: e.value})
		}
	}

	devices := &libvirtxml.DomainDeviceList{
		Disks: []libvirtxml.DomainDisk{{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: diskFormat, Cache: "none", Discard: "unmap"},
			Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: spec.DiskPath}},
			Target: &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
		}},
		Serials: []libvirtxml.DomainSerial{{
			// A pty chardev, so that virDomainOpenConsole can attach to it
			// (it refuses a file chardev), with a log: QEMU copies all
			// output to the log file, which with libvirt's default
			// stdio_handler=logd is written by virtlogd, which bounds and
			// rotates it (max_size/max_backups in virtlogd.conf). append
			// keeps the history across restarts of the domain. The log
			// records output only; what a console user types reaches it
			// only as the guest's echo.
			Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
			Target: &libvirtxml.DomainSerialTarget{Port: new(uint)},
			Log:    &libvirtxml.DomainChardevLog{File: spec.ConsoleLogPath, Append: "on"},
		}},
		// A virtio RNG: a TCG guest otherwise starves for entropy (cloud-init
		// generating SSH host keys waits for it).
		RNGs: []libvirtxml.DomainRNG{{
			Model:   "virtio",
			Backend: &libvirtxml.DomainRNGBackend{Random: &libvirtxml.DomainRNGBackendRandom{Device: "/dev/urandom"}},
		}},
		MemBalloon: &libvirtxml.DomainMemBalloon{Model: "none"},
	}
	if spec.ConfigDrivePath != "" {
		devices.Disks = append(devices.Disks, libvirtxml.DomainDisk{
			Device:   "cdrom",
			Driver:   &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
			Source:   &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: spec.ConfigDrivePath}},
			Target:   &libvirtxml.DomainDiskTarget{Dev: "hdc", Bus: "ide"},
			ReadOnly: &libvirtxml.DomainDiskReadOnly{},
		})
	}
	for _, n := range spec.NICs {
		iface := libvirtxml.DomainInterface{
			Source: &libvirtxml.DomainInterfaceSource{Ethernet: &libvirtxml.DomainInterfaceSourceEthernet{}},
			// managed='no': the tap exists already (the network adapter made
			// it and attached it to the bridge); libvirt must neither create
			// nor delete it.
			Target: &libvirtxml.DomainInterfaceTarget{Dev: n.TapName, Managed: "no"},
			MAC:    &libvirtxml.DomainInterfaceMAC{Address: n.MAC.String()},
			Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
		}
		if n.MTU > 0 {
			iface.MTU = &libvirtxml.DomainInterfaceMTU{Size: uint(n.MTU)}
		}
		devices.Interfaces = append(devices.Interfaces, iface)
	}

	dom := &libvirtxml.Domain{
		Type:          domType,
		Name:          hypervisor.DomainName(spec.VMID),
		UUID:          spec.VMID,
		Metadata:      &libvirtxml.DomainMetadata{XML: string(md)},
		Memory:        &libvirtxml.DomainMemory{Value: uint(spec.MemoryMiB), Unit: "MiB"},
		CurrentMemory: &libvirtxml.DomainCurrentMemory{Value: uint(spec.MemoryMiB), Unit: "MiB"},
		VCPU:          &libvirtxml.DomainVCPU{Placement: "static", Value: uint(spec.VCPUs)},
		SysInfo: []libvirtxml.DomainSysInfo{{SMBIOS: &libvirtxml.DomainSysInfoSMBIOS{
			System: &libvirtxml.DomainSysInfoSystem{Entry: entries},
		}}},
		OS: os,
		Features: &libvirtxml.DomainFeatureList{
			ACPI: &libvirtxml.DomainFeature{},
			APIC: &libvirtxml.DomainFeatureAPIC{},
		},
		CPU:        cpu,
		Clock:      &libvirtxml.DomainClock{Offset: "utc"},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		// A crashed guest stops; the agent reports it instead of looping.
		OnCrash: "destroy",
		Devices: devices,
	}
	s, err := dom.Marshal()
	if err != nil {
		return "", fmt.Errorf("marshal domain %s: %w", dom.Name, err)
	}
	return s, nil
}
