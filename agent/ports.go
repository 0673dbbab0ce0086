package agent

import (
	"context"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/network"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// The ports below are what the reconcile loop needs from the host. The real
// implementations are agent/hypervisor/libvirt, agent/network/linux,
// agent/disk and agent/imagecache; each package's conformance suite pins the
// behaviour these comments rely on.

// Hypervisor drives the domains of minicloud's VMs. Every call is idempotent:
// starting a running domain or undefining an absent one is not an error.
type Hypervisor interface {
	Capabilities(ctx context.Context) (hypervisor.HostCapabilities, error)
	Define(ctx context.Context, spec hypervisor.DomainSpec) error
	Start(ctx context.Context, vmID string) error
	Shutdown(ctx context.Context, vmID string, timeout time.Duration) error
	Destroy(ctx context.Context, vmID string) error
	Reboot(ctx context.Context, vmID string) error
	Undefine(ctx context.Context, vmID string) error
	Status(ctx context.Context, vmID string) (hypervisor.DomainStatus, error)
	// List returns only domains that carry minicloud's metadata element.
	List(ctx context.Context) ([]hypervisor.DomainStatus, error)
	// Events delivers lifecycle events; an event with an empty VMID means
	// "reconnected, resync everything".
	Events() <-chan hypervisor.Event
}

// Network plumbs guest ports into bridges, with anti-spoofing filters.
type Network interface {
	EnsureBridge(ctx context.Context, spec network.BridgeSpec) error
	// DeleteBridge removes a bridge and its rules; absent is not an error.
	DeleteBridge(ctx context.Context, name string) error
	// SetRemotePorts programs a tunnelled bridge with the other hosts'
	// ports; FailedPrecondition when the bridge or its tunnel is absent.
	SetRemotePorts(ctx context.Context, bridge string, ports []network.RemotePort) error
	EnsurePort(ctx context.Context, spec network.PortSpec) error
	DeletePort(ctx context.Context, tapName string) error
	// ListPorts returns every port minicloud created, with the VM it
	// belongs to.
	ListPorts(ctx context.Context) ([]network.PortSpec, error)
}

// Disks makes VM disks as copy-on-write overlays over cached images.
type Disks interface {
	CreateOverlay(ctx context.Context, path, backingPath, backingFormat string, sizeBytes int64) error
}

// ImageCache keeps image parts on this host, addressed by digest.
type ImageCache interface {
	// Ensure returns the local path of the part with digest sha256,
	// downloading and verifying it first if needed.
	Ensure(ctx context.Context, image string, part minicloudv1.ImagePart, sha256 string) (string, error)
}

// GuestServices answer guests on their networks: DHCP, DNS and the metadata
// service. They are fed the whole set of this host's guests at once, so a
// restart of the agent rebuilds them from the assignments alone.
type GuestServices interface {
	SetGuests(ctx context.Context, guests []Guest) error
	// BuildConfigDrive writes the config drive ISO of g to path.
	BuildConfigDrive(ctx context.Context, g Guest, path string) error
	// GuestSeen reports whether the guest has read its metadata (or user
	// data) since the given time: the GuestReady signal.
	GuestSeen(vmID string) (time.Time, bool)
}

// Guest is one VM as the guest-facing services see it.
type Guest struct {
	VM       *minicloudv1.VM
	UserData []byte
}
