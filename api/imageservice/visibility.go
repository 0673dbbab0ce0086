package imageservice

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// Visible says whether project may see image and boot VMs from it: its
// own images, public ones, and those of no project (stored before images
// had owners; they were visible to everyone then).
func Visible(img *minicloudv1.Image, project string) bool {
	owner := img.GetMeta().GetProject()
	return owner == "" || owner == project || img.GetVisibility() == minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC
}

// scope is whose images a call may see.
type scope struct {
	// all: every image (hosts fetch whatever their VMs boot from, and the
	// control plane acts for every project).
	all     bool
	project string
	// admin may change any image (admins act in every project).
	admin bool
}

// scopeOf is the scope of a call: a host or the control plane sees every
// image; a user sees the images Visible to the request's project (which
// the authenticating interceptor has checked and filled in). A call
// without a principal (an API that does not authenticate) that names no
// project sees every image, as before images had owners: agents on the
// plaintext all-in-one call so.
func (s *Service) scopeOf(ctx context.Context, reqProject string) (scope, error) {
	if p := auth.FromContext(ctx); p != nil && p.Kind != auth.KindUser {
		return scope{all: true}, nil
	} else if p == nil && reqProject == "" {
		return scope{all: true}, nil
	}
	project, err := s.projectOf(reqProject)
	if err != nil {
		return scope{}, err
	}
	return scope{project: project, admin: auth.FromContext(ctx).Can(project, auth.RoleAdmin)}, nil
}

func (sc scope) sees(img *minicloudv1.Image) bool { return sc.all || Visible(img, sc.project) }

// mayChange refuses a change (delete, visibility) of an image the scope's
// project does not own: NotFound if it cannot see it, PermissionDenied if
// it can (a public image of another project).
func (sc scope) mayChange(img *minicloudv1.Image) error {
	name, owner := img.GetMeta().GetName(), img.GetMeta().GetProject()
	switch {
	case sc.all || sc.admin || owner == sc.project:
		return nil
	case !sc.sees(img):
		return imageNotFound(name)
	case owner == "":
		return errdefs.PermissionDenied("image %q belongs to no project: only an admin may change it", name)
	default:
		return errdefs.PermissionDenied("image %q belongs to project %s: only that project may change it", name, owner)
	}
}

func imageNotFound(name string) error {
	return errdefs.NotFound("image %q not found (see `minicloud image list`)", name)
}

// getVisible reads one image the scope sees; another project's private
// image is NotFound, exactly as a missing one.
func (s *Service) getVisible(ctx context.Context, sc scope, name string) (*minicloudv1.Image, int64, error) {
	img, rev, err := s.get(ctx, name)
	if err != nil {
		return nil, 0, err
	}
	if !sc.sees(img) {
		return nil, 0, imageNotFound(name)
	}
	return img, rev, nil
}

// SetImageVisibility makes an image of the caller's project public or
// private. Who may make an image public is the policy table's business
// (admin); here only the owner project may change its image. A VM already
// booted from an image made private keeps running; new VMs of other
// projects can no longer boot from it.
func (s *Service) SetImageVisibility(ctx context.Context, req *minicloudv1.SetImageVisibilityRequest) (*minicloudv1.Image, error) {
	name := req.GetName()
	if err := validateName(name); err != nil {
		return nil, err
	}
	switch req.GetVisibility() {
	case minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE, minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC:
	default:
		return nil, errdefs.Invalid("visibility must be private or public")
	}
	sc, err := s.scopeOf(ctx, req.GetProject())
	if err != nil {
		return nil, err
	}
	for range deleteAttempts {
		img, rev, err := s.getVisible(ctx, sc, name)
		if err != nil {
			return nil, err
		}
		if err := sc.mayChange(img); err != nil {
			return nil, err
		}
		if img.GetMeta().GetProject() == "" {
			return nil, errdefs.FailedPrecondition("image %q belongs to no project (it predates image owners): it stays public; upload it again to give it an owner", name)
		}
		if img.GetVisibility() == req.GetVisibility() {
			return img, nil
		}
		img.Visibility = req.GetVisibility()
		stored := proto.CloneOf(img)
		stored.Meta.ResourceVersion = 0 // etcd's, never stored
		op, err := store.PutOp(store.ImageKey(name), stored)
		if err != nil {
			return nil, err
		}
		newRev, ok, err := store.Commit(ctx, s.etcd, []clientv3.Cmp{store.Unchanged(store.ImageKey(name), rev)}, []clientv3.Op{op})
		if err != nil {
			return nil, err
		}
		if ok {
			img.Meta.ResourceVersion = newRev
			s.log.Info("image visibility set", "image", name, "project", img.GetMeta().GetProject(), "visibility", img.GetVisibility().String())
			return img, nil
		}
	}
	return nil, errdefs.Conflict("image %q kept changing; retry", name)
}
