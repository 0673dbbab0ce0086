// Package agent is the hypervisor-host component: it registers its host with
// the API, keeps the host's heartbeat, watches the VMs assigned to the host,
// and converges each of them (image, disk, network, metadata, domain) in a
// level-triggered reconcile loop (reconcile.go). It reports what it observes
// back through the API; it never talks to etcd.
//
// The adapters it drives are passed in as Deps: the hypervisor and network
// ports (hypervisor.Driver, network.Manager, each with its conformance
// suite and an in-memory fake held to it), and the small interfaces below
// for disks, the image cache and the guest services (DHCP, DNS, metadata:
// agent/guestservices). The loop can be read without them, and is unit
// tested against the fakes (reconcile_test.go) and end to end against the
// real ones (e2e_test.go).
package agent

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/minicloud/minicloud/agent/consolehub"
	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/agent/qemuaccess"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// Config is the agent's configuration; cmd/minicloudd fills it from flags.
type Config struct {
	// HostName is this host's name in the cloud (default: os.Hostname).
	HostName string
	// AdvertiseAddr is host:port where the API reaches this agent's
	// AgentService (console logs).
	AdvertiseAddr string
	// StateDir holds per-VM state: StateDir/vms/<id>/{disk.qcow2,
	// config.iso,console.log} and the image cache StateDir/images.
	StateDir string
	// AvailabilityZone of this host.
	AvailabilityZone string
	// AllocationRatios registered for this host (0: the scheduler default).
	AllocationRatios *minicloudv1.AllocationRatios
	// Workers is how many VMs are reconciled at once.
	Workers int
	// ResyncPeriod is how often every VM is reconciled even without events,
	// to catch what events miss.
	ResyncPeriod time.Duration
	// ShutdownTimeout is how long an ACPI shutdown may take before the
	// domain is destroyed.
	ShutdownTimeout time.Duration
	// Version is reported on the Host record.
	Version string
	// TunnelIP is this host's underlay (VXLAN endpoint) address; invalid
	// (unset) keeps every network on this host only.
	TunnelIP netip.Addr
	// UnderlayMTU is the MTU of the interface holding TunnelIP; a network
	// whose MTU exceeds it minus VXLAN's overhead is refused on this host.
	UnderlayMTU int
	// QEMU is what QEMU may open under StateDir (qemuaccess): the
	// directories down to each VM's files, and the image cache. The zero
	// value gives nothing beyond root.
	QEMU qemuaccess.Access
	// Capacity, where a field is positive, replaces what the host measures
	// (vCPUs and memory from the hypervisor, disk from the file system of
	// StateDir): to reserve part of a machine for something else, or to
	// give each of several hosts sharing one machine (the lab) its own share.
	Capacity CapacityOverride
	// TrashGrace is how long the files of a VM that vanished from the API
	// (not deleted through it) are kept in StateDir/trash; default 24 h.
	TrashGrace time.Duration
	// FenceAfter is how long the agent goes on without renewing its
	// host's lease before it destroys its domains (self-fencing,
	// fencing.go); 0 never self-fences. It must be shorter than the lease
	// (15 s), and is registered so the control plane knows when the host
	// is proved to run nothing.
	FenceAfter time.Duration
	// AssignmentCacheMaxBytes bounds the assignments saved in StateDir
	// (assignmentcache.go); 0: DefaultAssignmentCacheMaxBytes.
	AssignmentCacheMaxBytes int64
}

// CapacityOverride is the capacity a host registers instead of the measured
// one; zero fields keep the measured value.
type CapacityOverride struct {
	VCPUs     int
	MemoryMiB int64
	DiskGiB   int64
}

func (c *Config) setDefaults() error {
	if c.HostName == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("host name: %w", err)
		}
		c.HostName = h
	}
	if c.StateDir == "" {
		return fmt.Errorf("agent state directory is not set")
	}
	if c.TrashGrace == 0 {
		c.TrashGrace = 24 * time.Hour
	}
	if c.Workers <= 0 {
		// A worker spends a create mostly waiting on libvirt and QEMU
		// (seconds under TCG) and a stop up to ShutdownTimeout, so a
		// small pool queues the rest of a burst behind them: with 4, the
		// 5th to 10th of ten concurrent creates waited for a free worker
		// (hack/agentbench, "agent pickup"). hack/setup-host.sh lets
		// libvirtd serve 32 calls of one client at once.
		c.Workers = 16
	}
	if c.ResyncPeriod <= 0 {
		c.ResyncPeriod = time.Minute
	}
	if c.FenceAfter < 0 {
		return fmt.Errorf("fence-after %s is negative (0: never self-fence)", c.FenceAfter)
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = 60 * time.Second
	}
	return nil
}

// Agent converges the VMs assigned to one host.
type Agent struct {
	cfg Config
	log *slog.Logger

	hosts        minicloudv1.HostServiceClient
	images       minicloudv1.ImageServiceClient
	imageRecords *imageRecords // images' GetImage, pinned per VM

	hv    hypervisor.Driver
	net   network.Manager
	disks Disks
	cache ImageCache
	guest GuestServices

	queue   *workQueue
	metrics *agentMetrics
	// consoles shares each VM's serial console among its sessions
	// (console.go).
	consoles *consolehub.Hub

	hypervisorKind string // "kvm" or "tcg", measured at start

	// creatingReportDelay: how long a create runs before it reports
	// CREATING on its own (creatingreport.go).
	creatingReportDelay time.Duration

	mu        sync.Mutex
	assigned  map[string]*assignment           // by VM id
	reported  map[string]*minicloudv1.VMStatus // last status this agent reported, by VM id
	synced    bool                             // the full assignment set has been received
	publishMu sync.Mutex                       // serialises publishGuests
	// bridgeMu keeps bridge collection apart from bridge creation;
	// creations (RLock) run at once, so that the concurrent creates of one
	// network share one bridge check (see linux.Manager.EnsureBridge).
	bridgeMu sync.RWMutex
	fwdMu    sync.Mutex // serialises port forward changes (portforwards.go)

	registered     chan struct{} // closed once the host is first registered
	registeredOnce sync.Once

	tunnelMu sync.Mutex
	tunnels  map[string]bool            // bridges with a tunnel, by name
	netPorts []*minicloudv1.NetworkPort // latest WatchNetworkPorts set

	// The assignments saved on disk (assignmentcache.go): cachedGuests
	// (by VM id) are served until the first BOOKMARK; saveAssignments asks
	// for a save.
	cachedGuests    map[string]Guest
	saveAssignments chan struct{}
	// guestsDirty are the VM ids whose guest services entry may differ
	// from assigned (or cachedGuests): the next publishGuests sends them,
	// and only them.
	guestsDirty map[string]bool

	fence    fenceState
	released map[string]bool      // VMs the API released from this host, under mu
	restarts map[string]time.Time // last restart after an unexpected stop, under mu
}

// assignment is one VM assigned to this host, as last received.
type assignment struct {
	vm       *minicloudv1.VM
	userData []byte
	seen     uint64 // stream generation that last delivered it
}

// Deps are the adapters the agent drives.
type Deps struct {
	API        grpc.ClientConnInterface
	Hypervisor hypervisor.Driver
	Network    network.Manager
	Disks      Disks
	Images     ImageCache
	Guest      GuestServices
}

// Option configures an Agent.
type Option func(*options)

type options struct{ log *slog.Logger }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(log *slog.Logger) Option { return func(o *options) { o.log = log } }

// Disks makes VM disks as copy-on-write overlays over cached images
// (agent/disk, with qemu-img).
type Disks interface {
	CreateOverlay(ctx context.Context, path, backingPath, backingFormat string, sizeBytes int64) error
	// ForgetUnder drops what the adapter remembers of the disks inside dir,
	// a VM directory the agent is about to move or remove whole.
	ForgetUnder(dir string)
}

// ImageCache keeps image parts on this host, addressed by digest
// (agent/imagecache).
type ImageCache interface {
	// Ensure returns the local path of the part with digest sha256,
	// downloading and verifying it first if needed.
	Ensure(ctx context.Context, image string, part minicloudv1.ImagePart, sha256 string) (string, error)
}

// GuestServices answer guests on their networks: DHCP, DNS and the metadata
// service (agent/guestservices). They are fed the changes of this host's
// guests, one VM at a time, so that the cost of a pass does not grow with
// the number of VMs; a restart of the agent rebuilds them from the
// assignments alone.
type GuestServices interface {
	// UpdateGuests serves each guest of upsert (replacing what its VM
	// had, unless that was a newer resource version) and stops serving
	// each VM id of remove at once. Guests named in neither keep what
	// they have.
	UpdateGuests(ctx context.Context, upsert []Guest, remove []string) error
	// BuildConfigDrive writes the config drive ISO of g to path. An error
	// made with Permanent fails the VM instead of being retried.
	BuildConfigDrive(ctx context.Context, g Guest, path string) error
	// GuestSeen reports when the guest last read its metadata (or user
	// data), and whether it ever did: the GuestReady signal.
	GuestSeen(vmID string) (time.Time, bool)
}

// Guest is one VM as the guest-facing services see it.
type Guest struct {
	VM       *minicloudv1.VM
	UserData []byte
}

// New returns an agent; Run starts it.
func New(cfg Config, d Deps, opts ...Option) (*Agent, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	o.log = cmp.Or(o.log, slog.Default())
	// QEMU runs as an unprivileged user and must traverse to the disks
	// (libvirt hands it the files themselves).
	if err := cfg.QEMU.MkdirAll(filepath.Join(cfg.StateDir, "vms")); err != nil {
		return nil, fmt.Errorf("create agent state directory: %w", err)
	}
	a := &Agent{
		cfg:         cfg,
		log:         o.log.With("component", "agent", "host", cfg.HostName),
		hosts:       minicloudv1.NewHostServiceClient(d.API),
		images:      minicloudv1.NewImageServiceClient(d.API),
		hv:          d.Hypervisor,
		net:         d.Network,
		disks:       d.Disks,
		cache:       d.Images,
		guest:       d.Guest,
		queue:       newWorkQueue(time.Second, 2*time.Minute),
		assigned:    map[string]*assignment{},
		guestsDirty: map[string]bool{},
		reported:    map[string]*minicloudv1.VMStatus{},
		registered:  make(chan struct{}),
		tunnels:     map[string]bool{},

		saveAssignments: make(chan struct{}, 1),

		// Until the first contact, the fence counts from the start: an
		// agent started while cut off fences its host all the same.
		fence:    fenceState{lastContact: time.Now()},
		released: map[string]bool{},
		restarts: map[string]time.Time{},

		creatingReportDelay: defaultCreatingReportDelay,
	}
	a.metrics = newAgentMetrics(a)
	a.consoles = consolehub.New(d.Hypervisor, consolehub.Limits{})
	a.imageRecords = newImageRecords(func(ctx context.Context, name string) (*minicloudv1.Image, error) {
		return a.images.GetImage(ctx, &minicloudv1.GetImageRequest{Name: name})
	})
	a.imageRecords.alive = a.assignedOnOneStream
	return a, nil
}

// Run registers the host and runs the loops until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	caps, err := a.hv.Capabilities(ctx)
	if err != nil {
		return fmt.Errorf("measure host capabilities: %w", err)
	}
	a.mu.Lock() // the metrics read it from another goroutine
	a.hypervisorKind = preferredHypervisor(caps.Hypervisors)
	a.mu.Unlock()
	a.log.Info("host capabilities", "vcpus", caps.VCPUs, "memory_mib", caps.MemoryMiB, "hypervisors", caps.Hypervisors)
	if o := a.cfg.Capacity; o != (CapacityOverride{}) {
		a.log.Info("capacity offered to the scheduler overridden (0: measured)", "vcpus", o.VCPUs, "memory_mib", o.MemoryMiB, "disk_gib", o.DiskGiB)
	}

	// Before anything waits for the API: guests are answered from the
	// saved assignments while it is down.
	if a.loadAssignmentCache() {
		a.publishGuests(ctx)
	}

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.saveAssignmentsLoop(ctx) })
	g.Go(func() error { return a.runHostSession(ctx, caps) })
	g.Go(func() error { return a.watchAssignments(ctx) })
	g.Go(func() error { return a.watchNetworkPorts(ctx) })
	g.Go(func() error { return a.watchDomainEvents(ctx) })
	g.Go(func() error { return a.resyncLoop(ctx) })
	g.Go(func() error { return a.fenceLoop(ctx) })
	for i := 0; i < a.cfg.Workers; i++ {
		g.Go(func() error { a.worker(ctx); return nil })
	}
	g.Go(func() error {
		<-ctx.Done()
		a.queue.ShutDown()
		return nil
	})
	err = g.Wait()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// GuestActive tells the agent that a guest has just been answered by the
// metadata service for the first time; its reconcile then sets GuestReady.
// It does not block, so the metadata service can call it on its hot path.
func (a *Agent) GuestActive(vmID string) { a.queue.Add(vmID) }

// reconcileTimeout bounds one reconcile pass: longer than an ACPI shutdown
// deadline plus a start under TCG on a loaded host.
const reconcileTimeout = 5 * time.Minute

func preferredHypervisor(kinds []string) string {
	for _, k := range kinds {
		if k == "kvm" {
			return "kvm"
		}
	}
	return "tcg"
}

func (a *Agent) worker(ctx context.Context) {
	for {
		id, ok := a.queue.Get()
		if !ok {
			return
		}
		res, err := a.reconcilePass(ctx, id)
		if err != nil && ctx.Err() == nil {
			a.log.Warn("reconcile failed; will retry", "vm", id, "err", err, "failures", a.queue.Failures(id)+1)
		}
		a.queue.Done(id, err, res.RequeueAfter)
	}
}

// reconcilePass is one timed pass over id, as a worker runs it: its wall
// time and its CPU time (passcpu.go) go to the metrics.
func (a *Agent) reconcilePass(ctx context.Context, id string) (result, error) {
	// A bound on one pass, so a hung libvirt or API call cannot hold a
	// worker forever; the key is retried with backoff.
	ctx, cancel := context.WithTimeout(ctx, reconcileTimeout)
	defer cancel()
	meter := &cpuMeter{}
	ctx = context.WithValue(ctx, cpuMeterKey{}, meter)
	var (
		res result
		err error
	)
	start := time.Now()
	measureCPU(ctx, func() { res, err = a.reconcile(ctx, id) })
	a.metrics.observeReconcile(time.Since(start), time.Duration(meter.ns.Load()), err)
	return res, err
}

// resyncLoop reconciles everything periodically: the level-triggered
// safety net for anything an event missed.
func (a *Agent) resyncLoop(ctx context.Context) error {
	t := time.NewTicker(a.cfg.ResyncPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			a.enqueueAll()
			a.syncForwardsLogged(ctx)
		}
	}
}

// enqueueAll queues every VM the agent knows of and every VM it holds
// something for on the host, so orphans are cleaned up too.
func (a *Agent) enqueueAll() {
	a.mu.Lock()
	for id := range a.assigned {
		a.queue.Add(id)
	}
	synced := a.synced
	a.mu.Unlock()
	if !synced {
		return
	}
	for _, id := range a.observedVMIDs() {
		a.queue.Add(id)
	}
}

// watchDomainEvents turns libvirt lifecycle events into reconcile requests.
func (a *Agent) watchDomainEvents(ctx context.Context) error {
	events := a.hv.Events()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return nil
			}
			if ev.VMID == "" { // resync after reconnecting to libvirtd
				a.enqueueAll()
				continue
			}
			a.queue.Add(ev.VMID)
		}
	}
}
