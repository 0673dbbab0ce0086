package server

import (
	"context"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// flavorService implements minicloudv1.FlavorServiceServer. Flavors are
// global and immutable: a VM copies its flavor's resources at create time.
type flavorService struct {
	minicloudv1.UnimplementedFlavorServiceServer
	s *Server
}

func flavorNotFound(name string) error {
	return errdefs.NotFound("flavor %s not found (see `minicloud flavor list`)", name)
}

func (f *flavorService) CreateFlavor(ctx context.Context, req *minicloudv1.CreateFlavorRequest) (*minicloudv1.Flavor, error) {
	if err := validateFlavor(req); err != nil {
		return nil, err
	}
	fl := &minicloudv1.Flavor{
		Meta:      metaFor(req.GetName(), ""),
		Vcpus:     req.GetVcpus(),
		MemoryMib: req.GetMemoryMib(),
		DiskGib:   req.GetDiskGib(),
	}
	if _, err := f.s.createObject(ctx, store.FlavorKey(req.GetName()), fl, fl.Meta,
		errdefs.AlreadyExists("flavor %s already exists", req.GetName())); err != nil {
		return nil, err
	}
	return fl, nil
}

func (f *flavorService) GetFlavor(ctx context.Context, req *minicloudv1.GetFlavorRequest) (*minicloudv1.Flavor, error) {
	if err := validateName("flavor", req.GetName()); err != nil {
		return nil, err
	}
	fl := &minicloudv1.Flavor{}
	if _, err := f.s.getObject(ctx, store.FlavorKey(req.GetName()), fl, fl.GetMeta, flavorNotFound(req.GetName())); err != nil {
		return nil, err
	}
	return fl, nil
}

func (f *flavorService) ListFlavors(ctx context.Context, req *minicloudv1.ListFlavorsRequest) (*minicloudv1.ListFlavorsResponse, error) {
	fls, next, err := listPage(ctx, f.s, "flavors", store.FlavorPrefix, "", req, func() *minicloudv1.Flavor { return &minicloudv1.Flavor{} }, nil)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.ListFlavorsResponse{Flavors: fls, NextPageToken: next}, nil
}

func (f *flavorService) DeleteFlavor(ctx context.Context, req *minicloudv1.DeleteFlavorRequest) (*minicloudv1.DeleteFlavorResponse, error) {
	name := req.GetName()
	if err := validateName("flavor", name); err != nil {
		return nil, err
	}
	reread := func() (int64, error) {
		return f.s.getObject(ctx, store.FlavorKey(name), &minicloudv1.Flavor{}, func() *minicloudv1.ObjectMeta { return nil }, flavorNotFound(name))
	}
	used := func(vm *minicloudv1.VM) bool { return vm.GetSpec().GetFlavor() == name }
	if err := f.s.deleteUnused(ctx, "flavor", name, store.FlavorKey(name), reread, used, nil); err != nil {
		return nil, err
	}
	return &minicloudv1.DeleteFlavorResponse{}, nil
}
