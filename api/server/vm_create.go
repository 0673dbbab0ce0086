package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/api/imageservice"
	"github.com/minicloud/minicloud/api/ipam"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

func newID() string { return uuid.NewString() }

// createRefs is what a create read in one snapshot: the objects the VM
// refers to, with the revisions its transaction compares.
type createRefs struct {
	existingID string // the VM a previous try with the same request id made
	// existingFingerprint identifies that try's parameters ("" before
	// fingerprints were stored).
	existingFingerprint string
	requestRev          int64
	nameTaken           bool
	image               *minicloudv1.Image
	imageRev            int64
	flavor              *minicloudv1.Flavor
	flavorRev           int64
	networks            []*minicloudv1.Network
	networkRevs         []int64
	// Per network: the probe of random addresses read with the rest (nil
	// if the network was not known yet) and what each of its gets found.
	probes  []*ipam.Probe
	present [][]int64
}

// readCreateRefs reads, in one snapshot, the request-id and name keys,
// every object the VM refers to and a probe of random addresses of each of
// its networks (ipam.Probe), and refuses references that do not exist. The
// probe is read in the same round trip when the network is known from an
// earlier create (its cidr and gateway are needed to pick the addresses);
// a probe made for another version of the network is not used (the
// allocator then reads its own).
func (s *Server) readCreateRefs(ctx context.Context, addrs *ipam.Read, project string, req *minicloudv1.CreateVMRequest, spec *minicloudv1.VMSpec) (*createRefs, error) {
	var reads store.Reads
	// The gets below, and up to ipam.ProbeSize per known network.
	reads.Grow(6 + len(spec.Networks)*(1+ipam.ProbeSize))
	var (
		name        = reads.Get(store.VMNameKey(project, req.GetName()), clientv3.WithCountOnly())
		image       = reads.Get(store.ImageKey(spec.Image))
		flavor      = reads.Get(store.FlavorKey(spec.Flavor))
		serverGroup = reads.Get(store.ServerGroupKey(project, spec.ServerGroup), clientv3.WithCountOnly())
		targetHost  = reads.Get(store.HostSpecKey(spec.TargetHost), clientv3.WithCountOnly())
		request     = reads.Get(store.VMRequestKey(project, req.GetRequestId()))
		networks    = make([]store.Read, len(spec.Networks))
		probes      = make([]*ipam.Probe, len(spec.Networks)) // nil: network not known yet
		probeReads  = make([][]store.Read, len(spec.Networks))
	)
	for i, n := range spec.Networks {
		networks[i] = reads.Get(store.NetworkKey(project, n))
	}
	for i, n := range spec.Networks {
		known, ok := s.knownNetworks.Load(store.NetworkKey(project, n))
		if !ok {
			continue
		}
		p, err := addrs.Probe(known.(*minicloudv1.Network))
		if err != nil {
			continue
		}
		probes[i] = p
		for _, op := range p.Ops() {
			probeReads[i] = append(probeReads[i], reads.Add(op))
		}
	}
	if err := reads.Do(ctx, s.etcd); err != nil {
		return nil, err
	}
	refs := &createRefs{}
	if req.GetRequestId() != "" {
		if kv := request.First(); kv != nil {
			refs.existingID, refs.existingFingerprint = store.ParseRequestValue(string(kv.Value))
			refs.requestRev = kv.ModRevision
		}
	}
	refs.nameTaken = name.Count() > 0
	if kv := image.First(); kv == nil {
		return refs, imageNotFound(spec.Image)
	} else {
		refs.image, refs.imageRev = &minicloudv1.Image{}, kv.ModRevision
		if err := store.Decode(kv, refs.image); err != nil {
			return nil, err
		}
		// Another project's private image is as absent as a missing one.
		if !imageservice.Visible(refs.image, project) {
			return refs, imageNotFound(spec.Image)
		}
	}
	if kv := flavor.First(); kv == nil {
		return refs, flavorNotFound(spec.Flavor)
	} else {
		refs.flavor, refs.flavorRev = &minicloudv1.Flavor{}, kv.ModRevision
		if err := store.Decode(kv, refs.flavor); err != nil {
			return nil, err
		}
	}
	if spec.ServerGroup != "" && serverGroup.Count() == 0 {
		return refs, serverGroupNotFound(project, spec.ServerGroup)
	}
	if spec.TargetHost != "" && targetHost.Count() == 0 {
		return refs, errdefs.NotFound("target host %s is not registered (see `minicloud host list`)", spec.TargetHost)
	}
	for i, n := range spec.Networks {
		kv := networks[i].First()
		if kv == nil {
			return refs, networkNotFound(project, n)
		}
		nw := &minicloudv1.Network{}
		if err := store.Decode(kv, nw); err != nil {
			return nil, err
		}
		refs.networks = append(refs.networks, nw)
		refs.networkRevs = append(refs.networkRevs, kv.ModRevision)
		present := make([]int64, len(probeReads[i]))
		for j, r := range probeReads[i] {
			present[j] = r.Count()
		}
		refs.probes, refs.present = append(refs.probes, probes[i]), append(refs.present, present)
		if !probes[i].For(nw) {
			s.knownNetworks.Store(store.NetworkKey(project, n), nw)
		}
	}
	return refs, nil
}

func imageNotFound(name string) error {
	return errdefs.NotFound("image %s not found (see `minicloud image list`)", name)
}

// errRetry says a create lost a race and must re-read and try again.
var errRetry = errors.New("retry")

// createVM makes a VM in one etcd transaction: spec, status with
// addresses, user-data, name index, request id and a first event, under
// compares that keep name and addresses unique and the referenced objects
// in place.
func (s *Server) createVM(ctx context.Context, req *minicloudv1.CreateVMRequest) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	spec, err := validateVMCreate(req)
	if err != nil {
		return nil, err
	}
	for attempt := range maxTxnAttempts {
		// The first try takes what the create refers to from the create
		// cache (createcache.go); a try after a lost race reads etcd.
		vm, err := s.tryCreateVM(ctx, project, req, spec, attempt == 0)
		if !errors.Is(err, errRetry) {
			return vm, err
		}
	}
	return nil, tooMuchContention("create vm " + req.GetName())
}

func (s *Server) tryCreateVM(ctx context.Context, project string, req *minicloudv1.CreateVMRequest, base *minicloudv1.VMSpec, fromCache bool) (*minicloudv1.VM, error) {
	addrRead := s.ipam.BeginRead()
	defer addrRead.End()
	var (
		refs *createRefs
		err  error
	)
	if fromCache {
		refs, fromCache = s.createCache.createRefs(project, base)
	}
	if !fromCache {
		refs, err = s.readCreateRefs(ctx, addrRead, project, req, base)
	}
	fingerprint := requestFingerprint(req)
	if refs != nil && refs.existingID != "" {
		// A retry of a create that went through: answer with that VM, even
		// if a referenced object has been deleted since; but the same id
		// with other parameters is a mistake to report, not to paper over
		// (AWS's IdempotentParameterMismatch).
		vm, err := store.GetVM(ctx, s.etcd, refs.existingID)
		if err == nil && refs.existingFingerprint != "" && refs.existingFingerprint != fingerprint {
			return nil, requestMismatch(req, vm)
		}
		if err == nil || !errdefs.IsNotFound(err) {
			return vm, err
		}
		// That VM is gone: this request id makes a new one.
	}
	if err != nil {
		return nil, err
	}
	if refs.nameTaken {
		return nil, errdefs.AlreadyExists("vm %s already exists in project %s", req.GetName(), project)
	}
	if minDisk := refs.image.GetMinDiskGib(); minDisk > refs.flavor.GetDiskGib() {
		return nil, errdefs.Invalid("image %s needs a disk of at least %d GiB; flavor %s has %d GiB: choose a larger flavor", base.Image, minDisk, base.Flavor, refs.flavor.GetDiskGib())
	}

	now := time.Now()
	// base is this request's own (validateVMCreate built it) and every
	// try sets these same fields, so it is not copied (a reflective deep
	// clone per create); the VM of a try that lost is dropped.
	spec := base
	spec.Resources = &minicloudv1.Resources{Vcpus: refs.flavor.GetVcpus(), MemoryMib: refs.flavor.GetMemoryMib(), DiskGib: refs.flavor.GetDiskGib()}
	spec.RequiredHypervisor = refs.image.GetRequiredHypervisor()
	vm := &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: newID(), Name: req.GetName(), Project: project, CreateTime: timestamppb.New(now), Labels: req.GetLabels()},
		Spec: spec,
		Status: &minicloudv1.VMStatus{
			Phase:      lifecycle.Pending,
			Reason:     lifecycle.ReasonCreated,
			Message:    "waiting for the scheduler to choose a host",
			UpdateTime: timestamppb.New(now),
		},
	}
	id := vm.Meta.Id

	nv := store.NewVM{VM: vm, UserData: req.GetUserData(), FlavorRev: refs.flavorRev, ImageRev: refs.imageRev, Now: now}
	doneRev := int64(-1) // the commit's revision, read by the reservations' deferred DoneAt
	for i, nw := range refs.networks {
		r, ok := (*ipam.Reservation)(nil), false
		if fromCache {
			if r, ok, err = s.ipam.ReserveFromView(nw); err != nil {
				return nil, err
			}
		}
		if !ok {
			if r, err = addrRead.Reserve(ctx, nw, refs.probes[i], refs.present[i]); err != nil {
				return nil, err
			}
		}
		defer func() { r.DoneAt(doneRev) }()
		nv.Networks = append(nv.Networks, store.NetworkRef{ID: nw.GetMeta().GetId(), Rev: refs.networkRevs[i]})
		vm.Status.Addresses = append(vm.Status.Addresses, &minicloudv1.VMAddress{
			Network:      nw.GetMeta().GetName(),
			Ip:           r.Addr.String(),
			PrefixLength: int32(r.Prefix.Bits()),
			Gateway:      r.Gateway.String(),
			Mac:          ipam.MAC(id, nw.GetMeta().GetId()),
			Bridge:       nw.GetBridge(),
			Mtu:          nw.GetMtu(),
			Vni:          nw.GetVni(),
			DisableNat:   !nw.GetNat(),
			DnsServers:   slices.Clone(nw.GetDnsServers()), // nw may be the create cache's
		})
	}
	var lease clientv3.LeaseID
	if rid := req.GetRequestId(); rid != "" {
		if lease, err = s.leases.get(ctx); err != nil {
			return nil, err
		}
		nv.RequestID, nv.RequestRev, nv.Lease, nv.RequestFingerprint = rid, refs.requestRev, lease, fingerprint
	}
	nv.Event = &minicloudv1.Event{
		Type: lifecycle.EventNormal, Reason: lifecycle.ReasonCreated, Source: "api",
		// Concatenated, not fmt.Sprintf: one allocation instead of one per
		// argument boxed, on every create.
		Message: "vm " + vm.Meta.Name + " created with image " + spec.Image + ", flavor " + spec.Flavor + ", addresses " + addressList(vm.Status.Addresses),
	}
	// The call's audit record goes in the same transaction: written if and
	// only if the VM is.
	record, recorded, audited, err := s.committedAudit(ctx)
	if err != nil {
		return nil, err
	}
	if audited {
		nv.Records = []clientv3.Op{record}
	}
	// Charged to the project's quota in the same transaction, together
	// with the project's other creates in flight (createbatch.go).
	rev, err := s.creates.commit(ctx, nv)
	if err == nil {
		doneRev = rev
	}
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			// The request id's lease or the audit record's.
			s.leases.forget(lease)
			s.audit.Forget()
			return nil, errRetry
		}
		return nil, err
	}
	if audited {
		recorded()
	}
	vm.Meta.ResourceVersion, vm.Status.StatusVersion = rev, rev
	s.log.Info("vm created", "vm", vm.Meta.Name, "project", project, "id", id, "rev", rev)
	return vm, nil
}

func addressList(addrs []*minicloudv1.VMAddress) string {
	out := ""
	for i, a := range addrs {
		if i > 0 {
			out += ", "
		}
		out += a.GetIp() + " on " + a.GetNetwork()
	}
	return out
}

// requestFingerprint identifies a create's parameters: the SHA-256 of the
// request's deterministic encoding (its project already filled in), so a
// retry of the same request matches and any other parameter does not.
func requestFingerprint(req *minicloudv1.CreateVMRequest) string {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// requestMismatch says how a create reusing a request id differs from the
// one that made vm.
func requestMismatch(req *minicloudv1.CreateVMRequest, vm *minicloudv1.VM) error {
	var diffs []string
	if req.GetName() != vm.GetMeta().GetName() {
		diffs = append(diffs, fmt.Sprintf("name %s, not %s", req.GetName(), vm.GetMeta().GetName()))
	}
	if req.GetSpec().GetImage() != vm.GetSpec().GetImage() {
		diffs = append(diffs, fmt.Sprintf("image %s, not %s", req.GetSpec().GetImage(), vm.GetSpec().GetImage()))
	}
	if req.GetSpec().GetFlavor() != vm.GetSpec().GetFlavor() {
		diffs = append(diffs, fmt.Sprintf("flavor %s, not %s", req.GetSpec().GetFlavor(), vm.GetSpec().GetFlavor()))
	}
	if len(diffs) == 0 {
		diffs = append(diffs, "other parameters (user-data, networks, labels, metadata or keys)")
	}
	return errdefs.FailedPrecondition("request_id %s was used for another create (vm %s) and this one differs: %s; use a new request_id for a different VM",
		req.GetRequestId(), vm.GetMeta().GetName(), strings.Join(diffs, "; "))
}
