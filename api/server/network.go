package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/netip"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// networkService implements minicloudv1.NetworkServiceServer. Every
// network is a bridge with its gateway address on every host, so CIDRs may
// not overlap, not even across projects.
type networkService struct {
	minicloudv1.UnimplementedNetworkServiceServer
	s *Server
}

func networkNotFound(project, name string) error {
	return errdefs.NotFound("network %s not found in project %s (see `minicloud network list`)", name, project)
}

// bridgeName is "mc-" and 8 hex characters of the network id's hash: unique
// enough, and within Linux's 15-character interface names.
func bridgeName(networkID string) string {
	h := sha256.Sum256([]byte(networkID))
	return "mc-" + hex.EncodeToString(h[:4])
}

func (n *networkService) CreateNetwork(ctx context.Context, req *minicloudv1.CreateNetworkRequest) (*minicloudv1.Network, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := validateName("network", req.GetName()); err != nil {
		return nil, err
	}
	plan, err := validateNetwork(req)
	if err != nil {
		return nil, err
	}
	if err := n.s.refuseReserved(plan.prefix); err != nil {
		return nil, err
	}
	meta := metaFor(req.GetName(), project)
	nw := &minicloudv1.Network{
		Meta:       meta,
		Cidr:       plan.prefix.String(),
		Gateway:    plan.gateway.String(),
		Mtu:        plan.mtu,
		Bridge:     bridgeName(meta.Id),
		Nat:        !req.GetDisableNat(),
		DnsServers: plan.dns,
	}
	key := store.NetworkKey(project, req.GetName())
	exists := errdefs.AlreadyExists("network %s already exists in project %s", req.GetName(), project)
	for range maxTxnAttempts {
		all, rev, err := store.List(ctx, n.s.etcd, store.NetworkPrefix, func() *minicloudv1.Network { return &minicloudv1.Network{} })
		if err != nil {
			return nil, err
		}
		for _, o := range all {
			if o.Key == key {
				return nil, exists
			}
			if other, err := netip.ParsePrefix(o.Value.GetCidr()); err == nil && other.Overlaps(plan.prefix) {
				return nil, errdefs.FailedPrecondition("cidr %s overlaps network %s: networks share every host's routing table, choose a disjoint range", plan.prefix, describeNetwork(o.Value))
			}
		}
		hostsRev, err := n.s.refuseHostAddresses(ctx, plan.prefix)
		if err != nil {
			return nil, err
		}
		// The VNI is taken in the same transaction as the network is written.
		vni, free, take, err := store.VNIAllocation(ctx, n.s.etcd, n.s.vniRange(), meta.Id)
		if err != nil {
			return nil, err
		}
		nw.Vni = vni
		quotaCmps, quotaOps, err := n.s.chargeOps(ctx, quotaShare{project, networkShare})
		if err != nil {
			return nil, err
		}
		// No network may appear between the overlap scan and the write.
		ok, err := n.s.createObjectWith(ctx, key, nw, meta, exists,
			append([]clientv3.Cmp{store.UnchangedSince(store.NetworkPrefix, rev), store.UnchangedSince(store.HostSpecPrefix, hostsRev), free}, quotaCmps...), append([]clientv3.Op{take}, quotaOps...))
		if err != nil || ok {
			return nw, err
		}
	}
	return nil, tooMuchContention("create network " + req.GetName())
}

func (n *networkService) GetNetwork(ctx context.Context, req *minicloudv1.GetNetworkRequest) (*minicloudv1.Network, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := validateName("network", req.GetName()); err != nil {
		return nil, err
	}
	nw := &minicloudv1.Network{}
	if _, err := n.s.getObject(ctx, store.NetworkKey(project, req.GetName()), nw, nw.GetMeta, networkNotFound(project, req.GetName())); err != nil {
		return nil, err
	}
	return nw, nil
}

func (n *networkService) ListNetworks(ctx context.Context, req *minicloudv1.ListNetworksRequest) (*minicloudv1.ListNetworksResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	nws, next, err := listPage(ctx, n.s, "networks", store.NetworkKey(project, ""), "", req, func() *minicloudv1.Network { return &minicloudv1.Network{} }, nil)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.ListNetworksResponse{Networks: nws, NextPageToken: next}, nil
}

func (n *networkService) DeleteNetwork(ctx context.Context, req *minicloudv1.DeleteNetworkRequest) (*minicloudv1.DeleteNetworkResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	name := req.GetName()
	if err := validateName("network", name); err != nil {
		return nil, err
	}
	key := store.NetworkKey(project, name)
	var id string
	var vni uint32
	reread := func() (int64, error) {
		nw := &minicloudv1.Network{}
		rev, err := n.s.getObject(ctx, key, nw, nw.GetMeta, networkNotFound(project, name))
		id, vni = nw.GetMeta().GetId(), nw.GetVni()
		return rev, err
	}
	used := func(vm *minicloudv1.VM) bool {
		return vm.GetMeta().GetProject() == project && slices.Contains(vm.GetSpec().GetNetworks(), name)
	}
	// The IPAM range is empty once no VM uses the network; deleting it too
	// keeps a stray key (from a crash of an older version) from outliving it.
	ipamRange := func() clientv3.Op { return clientv3.OpDelete(store.IPAMNetworkPrefix(id), clientv3.WithPrefix()) }
	if _, err := reread(); err != nil {
		return nil, err
	}
	// The VNI is released in the delete's transaction: the network read
	// (and its VNI) is compared unchanged there.
	if err := n.s.deleteUnused(ctx, "network", name, key, reread, used, &quotaShare{project, networkShare}, append([]clientv3.Op{ipamRange()}, store.VNIRelease(vni)...)...); err != nil {
		return nil, err
	}
	return &minicloudv1.DeleteNetworkResponse{}, nil
}

// networkShare is what a network counts in its project's quota.
var networkShare = &minicloudv1.QuotaUsage{Networks: 1}

// vniRange is the configured VNI range, or the default.
func (s *Server) vniRange() store.VNIRange {
	if s.vnis == (store.VNIRange{}) {
		return store.DefaultVNIRange
	}
	return s.vnis
}
