package server

import (
	"context"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// serverGroupService implements minicloudv1.ServerGroupServiceServer. The
// scheduler reads a VM's group to apply (anti-)affinity.
type serverGroupService struct {
	minicloudv1.UnimplementedServerGroupServiceServer
	s *Server
}

func serverGroupNotFound(project, name string) error {
	return errdefs.NotFound("server group %s not found in project %s", name, project)
}

func (g *serverGroupService) CreateServerGroup(ctx context.Context, req *minicloudv1.CreateServerGroupRequest) (*minicloudv1.ServerGroup, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := validateServerGroup(req); err != nil {
		return nil, err
	}
	sg := &minicloudv1.ServerGroup{Meta: metaFor(req.GetName(), project), Policy: req.GetPolicy()}
	for range maxTxnAttempts {
		quotaCmps, quotaOps, err := g.s.chargeOps(ctx, quotaShare{project, serverGroupShare})
		if err != nil {
			return nil, err
		}
		ok, err := g.s.createObjectWith(ctx, store.ServerGroupKey(project, req.GetName()), sg, sg.Meta,
			errdefs.AlreadyExists("server group %s already exists in project %s", req.GetName(), project), quotaCmps, quotaOps)
		if err != nil || ok {
			return sg, err
		}
	}
	return nil, tooMuchContention("create server group " + req.GetName())
}

// serverGroupShare is what a server group counts in its project's quota.
var serverGroupShare = &minicloudv1.QuotaUsage{ServerGroups: 1}

func (g *serverGroupService) GetServerGroup(ctx context.Context, req *minicloudv1.GetServerGroupRequest) (*minicloudv1.ServerGroup, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := validateName("server group", req.GetName()); err != nil {
		return nil, err
	}
	sg := &minicloudv1.ServerGroup{}
	if _, err := g.s.getObject(ctx, store.ServerGroupKey(project, req.GetName()), sg, sg.GetMeta, serverGroupNotFound(project, req.GetName())); err != nil {
		return nil, err
	}
	return sg, nil
}

func (g *serverGroupService) ListServerGroups(ctx context.Context, req *minicloudv1.ListServerGroupsRequest) (*minicloudv1.ListServerGroupsResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	sgs, next, err := listPage(ctx, g.s, "servergroups", store.ServerGroupKey(project, ""), "", req, func() *minicloudv1.ServerGroup { return &minicloudv1.ServerGroup{} }, nil)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.ListServerGroupsResponse{ServerGroups: sgs, NextPageToken: next}, nil
}

func (g *serverGroupService) DeleteServerGroup(ctx context.Context, req *minicloudv1.DeleteServerGroupRequest) (*minicloudv1.DeleteServerGroupResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	name := req.GetName()
	if err := validateName("server group", name); err != nil {
		return nil, err
	}
	key := store.ServerGroupKey(project, name)
	reread := func() (int64, error) {
		return g.s.getObject(ctx, key, &minicloudv1.ServerGroup{}, func() *minicloudv1.ObjectMeta { return nil }, serverGroupNotFound(project, name))
	}
	used := func(vm *minicloudv1.VM) bool {
		return vm.GetMeta().GetProject() == project && vm.GetSpec().GetServerGroup() == name
	}
	if err := g.s.deleteUnused(ctx, "server group", name, key, reread, used, &quotaShare{project, serverGroupShare}); err != nil {
		return nil, err
	}
	return &minicloudv1.DeleteServerGroupResponse{}, nil
}
