package hypervisor

import "time"

// DomainStats are a running domain's cumulative counters since it started,
// as the hypervisor measured them at Time. Rates are the consumer's: two
// samples and their times.
type DomainStats struct {
	Time time.Time
	// CPUTimeNs is the guest's CPU time, all vCPUs together.
	CPUTimeNs uint64
	VCPUs     int
	// Memory in KiB: what the guest was given (Actual) and the resident
	// set of its hypervisor process (RSS). Available and Unused need a
	// balloon driver in the guest and are 0 without one.
	MemoryActualKiB    uint64
	MemoryRSSKiB       uint64
	MemoryAvailableKiB uint64
	MemoryUnusedKiB    uint64
	Disks              []DiskStats
	Interfaces         []InterfaceStats
}

// DiskStats count one disk's I/O; Device is the guest-visible target (vda).
type DiskStats struct {
	Device     string
	ReadBytes  uint64
	ReadOps    uint64
	WriteBytes uint64
	WriteOps   uint64
}

// InterfaceStats count one NIC's traffic on its host-side tap (Device), as
// the hypervisor reports it for the domain's interface.
type InterfaceStats struct {
	Device    string
	RxBytes   uint64
	RxPackets uint64
	RxDrops   uint64
	RxErrors  uint64
	TxBytes   uint64
	TxPackets uint64
	TxDrops   uint64
	TxErrors  uint64
}
