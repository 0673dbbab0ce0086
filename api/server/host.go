package server

import (
	"context"
	"errors"
	"strconv"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// hostService implements minicloudv1.HostServiceServer: agents register,
// heartbeat, watch their assignments and report what they observe;
// operators list, disable and enable hosts.
//
// A host is hosts/spec/<name> (what the agent registered, plus the admin's
// disabled flag), hosts/alive/<name> (attached to a lease the heartbeats
// keep alive: the host is UP while the key exists) and hosts/alloc/<name>
// (the scheduler's sum of claims).
type hostService struct {
	minicloudv1.UnimplementedHostServiceServer
	s *Server
}

// Default allocation ratios (OpenStack's initial_*_allocation_ratio).
const (
	defaultCPURatio  = 4.0
	defaultRAMRatio  = 1.0
	defaultDiskRatio = 1.0
)

func hostNotFound(name string) error {
	return errdefs.NotFound("host %s is not registered (see `minicloud host list`)", name)
}

func (h *hostService) RegisterHost(ctx context.Context, req *minicloudv1.RegisterHostRequest) (*minicloudv1.RegisterHostResponse, error) {
	if err := h.s.authorizeHost(ctx, req.GetHost().GetMeta().GetName()); err != nil {
		return nil, err
	}
	if err := validateHost(req.GetHost()); err != nil {
		return nil, err
	}
	in := req.GetHost()
	name := in.GetMeta().GetName()
	err := h.s.updateHost(ctx, name, func(old *minicloudv1.Host) (*minicloudv1.Host, error) {
		host := &minicloudv1.Host{
			Meta:              &minicloudv1.ObjectMeta{Id: old.GetMeta().GetId(), Name: name, CreateTime: old.GetMeta().GetCreateTime(), Labels: in.GetMeta().GetLabels()},
			Address:           in.GetAddress(),
			Capacity:          in.GetCapacity(),
			AllocationRatios:  withDefaultRatios(in.GetAllocationRatios()),
			Hypervisors:       in.GetHypervisors(),
			AvailabilityZone:  in.GetAvailabilityZone(),
			AgentVersion:      in.GetAgentVersion(),
			TunnelIp:          in.GetTunnelIp(),
			FenceAfterSeconds: in.GetFenceAfterSeconds(),
			// The admin's word outlives re-registration.
			Disabled:       old.GetDisabled(),
			DisabledReason: old.GetDisabledReason(),
		}
		if host.Meta.Id == "" {
			host.Meta.Id, host.Meta.CreateTime = newID(), timestamppb.Now()
		}
		return host, nil
	})
	if err != nil {
		return nil, err
	}
	h.s.log.Info("host registered", "host", name, "address", in.GetAddress())
	view, err := h.s.getHost(ctx, name)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.RegisterHostResponse{
		Host:                     view,
		HeartbeatIntervalSeconds: int64(HeartbeatInterval / time.Second),
		LeaseTtlSeconds:          int64(HostLeaseTTL / time.Second),
	}, nil
}

func withDefaultRatios(in *minicloudv1.AllocationRatios) *minicloudv1.AllocationRatios {
	r := proto.CloneOf(in)
	if r == nil {
		r = &minicloudv1.AllocationRatios{}
	}
	if r.Cpu == 0 {
		r.Cpu = defaultCPURatio
	}
	if r.Ram == 0 {
		r.Ram = defaultRAMRatio
	}
	if r.Disk == 0 {
		r.Disk = defaultDiskRatio
	}
	return r
}

// updateHost rewrites hosts/spec/<name> under optimistic concurrency:
// change gets the stored host (nil if there is none) and returns the new
// one; it runs again if another writer got in between.
func (s *Server) updateHost(ctx context.Context, name string, change func(old *minicloudv1.Host) (*minicloudv1.Host, error)) error {
	key := store.HostSpecKey(name)
	for range maxTxnAttempts {
		var old *minicloudv1.Host
		stored := &minicloudv1.Host{}
		modRev, err := store.Get(ctx, s.etcd, key, stored)
		switch {
		case err == nil:
			old = stored
		case !errdefs.IsNotFound(err):
			return err
		}
		next, err := change(old)
		if err != nil {
			return err
		}
		op, err := store.PutOp(key, next)
		if err != nil {
			return err
		}
		_, ok, err := store.Commit(ctx, s.etcd, []clientv3.Cmp{store.Unchanged(key, modRev)}, []clientv3.Op{op})
		if err != nil || ok {
			return err
		}
	}
	return tooMuchContention("update host " + name)
}

// Heartbeat keeps the host's lease alive, or grants a new one (and
// re-attaches hosts/alive/<name>) when it expired.
func (h *hostService) Heartbeat(ctx context.Context, req *minicloudv1.HeartbeatRequest) (*minicloudv1.HeartbeatResponse, error) {
	name := req.GetName()
	if err := h.s.authorizeHost(ctx, name); err != nil {
		return nil, err
	}
	if err := validateHostname("host name", name); err != nil {
		return nil, err
	}
	resp, err := store.ReadTxn(ctx, h.s.etcd,
		clientv3.OpGet(store.HostSpecKey(name), clientv3.WithCountOnly()),
		clientv3.OpGet(store.HostAliveKey(name)))
	if err != nil {
		return nil, err
	}
	if resp.Responses[0].GetResponseRange().GetCount() == 0 {
		return nil, errdefs.NotFound("host %s is not registered: the agent must call RegisterHost before Heartbeat", name)
	}
	if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
		if id, err := strconv.ParseInt(string(kvs[0].Value), 10, 64); err == nil {
			_, err := h.s.etcd.KeepAliveOnce(ctx, clientv3.LeaseID(id))
			if err == nil {
				return &minicloudv1.HeartbeatResponse{}, nil
			}
			if !errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "renew lease of host %s", name)
			}
		}
	}
	grant, err := h.s.etcd.Grant(ctx, int64(HostLeaseTTL/time.Second))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "grant lease for host %s", name)
	}
	if _, err := h.s.etcd.Txn(ctx).Then(store.HostUpOps(name, grant.ID)...).Commit(); err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "mark host %s alive", name)
	}
	h.s.log.Info("host up", "host", name, "lease", int64(grant.ID))
	return &minicloudv1.HeartbeatResponse{}, nil
}

// getHost merges a host's spec, liveness and allocation.
func (s *Server) getHost(ctx context.Context, name string) (*minicloudv1.Host, error) {
	hosts, err := s.readHosts(ctx, name)
	if err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		return nil, hostNotFound(name)
	}
	return hosts[0], nil
}

// readHosts reads one host's spec, alive, allocation, down and fenced
// keys in one snapshot and merges them.
func (s *Server) readHosts(ctx context.Context, name string) ([]*minicloudv1.Host, error) {
	var reads store.Reads
	spec, alive, alloc := reads.Get(store.HostSpecKey(name)), reads.Get(store.HostAliveKey(name)), reads.Get(store.HostAllocKey(name))
	down, fenced := reads.Get(store.HostDownKey(name)), reads.Get(store.HostFencedKey(name))
	if err := reads.Do(ctx, s.etcd); err != nil {
		return nil, err
	}
	return s.mergeHosts(ctx, spec.KVs(), hostKeys{alive: alive.KVs(), alloc: alloc.KVs(), down: down.KVs(), fenced: fenced.KVs()})
}

// hostKeys are the keys of hosts besides their specs, read in the specs'
// snapshot.
type hostKeys struct {
	alive, alloc, down, fenced []*mvccpb.KeyValue
}

// mergeHosts merges host spec keys with their other keys.
func (s *Server) mergeHosts(ctx context.Context, specs []*mvccpb.KeyValue, keys hostKeys) ([]*minicloudv1.Host, error) {
	alive := map[string]clientv3.LeaseID{}
	for _, kv := range keys.alive {
		alive[store.LastSegment(string(kv.Key))] = clientv3.LeaseID(kv.Lease)
	}
	allocs, err := store.DecodeByName(keys.alloc, func() *minicloudv1.HostAllocation { return &minicloudv1.HostAllocation{} })
	if err != nil {
		return nil, err
	}
	down, err := store.DecodeByName(keys.down, func() *timestamppb.Timestamp { return &timestamppb.Timestamp{} })
	if err != nil {
		return nil, err
	}
	fenced, err := store.DecodeByName(keys.fenced, func() *minicloudv1.HostFence { return &minicloudv1.HostFence{} })
	if err != nil {
		return nil, err
	}
	var hosts []*minicloudv1.Host
	for _, kv := range specs {
		host := &minicloudv1.Host{}
		if err := store.Decode(kv, host); err != nil {
			return nil, err
		}
		name := store.LastSegment(string(kv.Key))
		if host.Meta == nil {
			host.Meta = &minicloudv1.ObjectMeta{Name: name}
		}
		host.Meta.ResourceVersion = kv.ModRevision
		switch lease, ok := alive[name]; {
		case ok:
			host.State = minicloudv1.HostState_HOST_STATE_UP
			host.LastHeartbeat = s.lastHeartbeat(ctx, lease)
		case fenced[name] != nil:
			host.State, host.Fence = minicloudv1.HostState_HOST_STATE_FENCED, fenced[name]
			host.UnreachableSince = down[name]
		default:
			host.State, host.UnreachableSince = minicloudv1.HostState_HOST_STATE_UNREACHABLE, down[name]
		}
		if a, ok := allocs[name]; ok {
			host.Allocated, host.VmCount = a.GetAllocated(), a.GetVmCount()
		}
		hosts = append(hosts, host)
	}
	return hosts, nil
}

// lastHeartbeat derives the time of the last renewal from what is left of
// the lease, so heartbeats need no write of their own.
func (s *Server) lastHeartbeat(ctx context.Context, lease clientv3.LeaseID) *timestamppb.Timestamp {
	ttl, err := s.etcd.TimeToLive(ctx, lease)
	if err != nil || ttl.TTL < 0 {
		return nil
	}
	return timestamppb.New(time.Now().Add(-time.Duration(ttl.GrantedTTL-ttl.TTL) * time.Second).Truncate(time.Second))
}

func (h *hostService) ListHosts(ctx context.Context, req *minicloudv1.ListHostsRequest) (*minicloudv1.ListHostsResponse, error) {
	p, err := h.s.pages.Open("hosts", store.HostSpecPrefix, "", req)
	if err != nil {
		return nil, err
	}
	resp := &minicloudv1.ListHostsResponse{}
	resp.NextPageToken, err = p.Scan(ctx, h.s.etcd, func(specs []*mvccpb.KeyValue, rev int64) (int, error) {
		// The alive keys and allocations of the page's hosts: the same
		// names under their prefixes, read at the page's snapshot.
		first, last := store.LastSegment(string(specs[0].Key)), store.LastSegment(string(specs[len(specs)-1].Key))
		var reads store.Reads
		between := func(key func(string) string) store.Read {
			return reads.Get(key(first), clientv3.WithRange(key(last)+"\x00"), clientv3.WithRev(rev))
		}
		alive, alloc := between(store.HostAliveKey), between(store.HostAllocKey)
		down, fenced := between(store.HostDownKey), between(store.HostFencedKey)
		if err := reads.Do(ctx, h.s.etcd); err != nil {
			return 0, err
		}
		hosts, err := h.s.mergeHosts(ctx, specs, hostKeys{alive: alive.KVs(), alloc: alloc.KVs(), down: down.KVs(), fenced: fenced.KVs()})
		resp.Hosts = append(resp.Hosts, hosts...)
		return len(hosts), err
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (h *hostService) GetHost(ctx context.Context, req *minicloudv1.GetHostRequest) (*minicloudv1.Host, error) {
	if err := validateHostname("host name", req.GetName()); err != nil {
		return nil, err
	}
	return h.s.getHost(ctx, req.GetName())
}

func (h *hostService) DisableHost(ctx context.Context, req *minicloudv1.DisableHostRequest) (*minicloudv1.Host, error) {
	return h.setDisabled(ctx, req.GetName(), true, req.GetReason())
}

func (h *hostService) EnableHost(ctx context.Context, req *minicloudv1.EnableHostRequest) (*minicloudv1.Host, error) {
	return h.setDisabled(ctx, req.GetName(), false, "")
}

// setDisabled flips the admin's disabled flag; the scheduler places no new
// VM on a disabled host, running VMs stay.
func (h *hostService) setDisabled(ctx context.Context, name string, disabled bool, reason string) (*minicloudv1.Host, error) {
	if err := validateHostname("host name", name); err != nil {
		return nil, err
	}
	if len(reason) > 255 {
		return nil, errdefs.Invalid("reason is %d characters; keep it under 256", len(reason))
	}
	err := h.s.updateHost(ctx, name, func(old *minicloudv1.Host) (*minicloudv1.Host, error) {
		if old == nil {
			return nil, hostNotFound(name)
		}
		old.Disabled, old.DisabledReason = disabled, reason
		return old, nil
	})
	if err != nil {
		return nil, err
	}
	h.s.log.Info("host disabled flag set", "host", name, "disabled", disabled, "reason", reason)
	return h.s.getHost(ctx, name)
}

// authorizeRegisteredHost is the preamble of a host's streams: the caller
// is the host itself (its certificate, on a TLS server), the name is valid,
// and the host is registered.
func (h *hostService) authorizeRegisteredHost(ctx context.Context, name string) error {
	if err := h.s.authorizeHost(ctx, name); err != nil {
		return err
	}
	if err := validateHostname("host name", name); err != nil {
		return err
	}
	if resp, err := h.s.etcd.Get(ctx, store.HostSpecKey(name), clientv3.WithCountOnly()); err != nil {
		return errdefs.Wrap(errdefs.KindUnavailable, err, "read host %s", name)
	} else if resp.Count == 0 {
		return errdefs.NotFound("host %s is not registered: call RegisterHost first", name)
	}
	return nil
}

// WatchAssignments streams the VMs whose status.host is the host: first all
// of them as ADDED (with user-data), then a BOOKMARK, then changes. A VM
// that leaves the host (deleted, rescheduled) is sent as DELETED.
func (h *hostService) WatchAssignments(req *minicloudv1.WatchAssignmentsRequest, stream minicloudv1.HostService_WatchAssignmentsServer) error {
	ctx := stream.Context()
	name := req.GetHost()
	if err := h.authorizeRegisteredHost(ctx, name); err != nil {
		return err
	}
	match := func(vm *minicloudv1.VM) bool { return vm.GetStatus().GetHost() == name }
	send := func(typ minicloudv1.WatchEventType, vm *minicloudv1.VM, rev int64) error {
		ev := &minicloudv1.AssignmentEvent{Type: typ, Vm: vm, ResourceVersion: rev}
		if typ == minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED && vm.GetSpec().GetHasUserData() {
			resp, err := h.s.etcd.Get(ctx, store.VMUserDataKey(vm.GetMeta().GetId()))
			if err != nil {
				return errdefs.Wrap(errdefs.KindUnavailable, err, "read user-data of vm %s", vm.GetMeta().GetId())
			}
			if len(resp.Kvs) > 0 {
				ev.UserData = resp.Kvs[0].Value
			}
		}
		return stream.Send(ev)
	}
	return h.s.watchVMs(ctx, 0, match, func(vms []*minicloudv1.VM, rev int64) error {
		for _, vm := range vms {
			if err := send(minicloudv1.WatchEventType_WATCH_EVENT_TYPE_ADDED, vm, rev); err != nil {
				return err
			}
		}
		// VMs that left the host while it was fenced: it must destroy
		// them before it starts anything (the agent does so before it
		// acts on the BOOKMARK).
		released, err := store.ListReleased(ctx, h.s.etcd, name, rev)
		if err != nil {
			return err
		}
		for _, id := range released {
			ev := &minicloudv1.AssignmentEvent{
				Type: minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED, Released: true, ResourceVersion: rev,
				Vm: &minicloudv1.VM{Meta: &minicloudv1.ObjectMeta{Id: id}},
			}
			if err := stream.Send(ev); err != nil {
				return err
			}
		}
		return stream.Send(&minicloudv1.AssignmentEvent{Type: minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK, ResourceVersion: rev})
	}, send)
}
