package server

import (
	"context"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// Token lifetimes and bounds (docs/security.md).
const (
	DefaultTokenTTL  = 30 * 24 * time.Hour
	MinTokenTTL      = time.Minute
	MaxTokenTTL      = 365 * 24 * time.Hour
	MaxTokensPerUser = 100
	maxDescription   = 255
)

type authService struct {
	minicloudv1.UnimplementedAuthServiceServer
	s *Server
}

func (a *authService) CreateProject(ctx context.Context, req *minicloudv1.CreateProjectRequest) (*minicloudv1.Project, error) {
	if err := validateName("project", req.GetName()); err != nil {
		return nil, err
	}
	if err := validateDescription(req.GetDescription()); err != nil {
		return nil, err
	}
	p := &minicloudv1.Project{Name: req.GetName(), Description: req.GetDescription(), CreateTime: timestamppb.Now()}
	if err := store.CreateProject(ctx, a.s.etcd, p); err != nil {
		return nil, err
	}
	return p, nil
}

func (a *authService) GetProject(ctx context.Context, req *minicloudv1.GetProjectRequest) (*minicloudv1.Project, error) {
	if err := validateName("project", req.GetName()); err != nil {
		return nil, err
	}
	notFound := errdefs.NotFound("project %s not found", req.GetName())
	if !auth.FromContext(ctx).SeesProject(req.GetName()) {
		return nil, notFound
	}
	p := &minicloudv1.Project{}
	if _, err := store.Get(ctx, a.s.etcd, store.ProjectKey(req.GetName()), p); errdefs.IsNotFound(err) {
		return nil, notFound
	} else if err != nil {
		return nil, err
	}
	return p, nil
}

// ListProjects lists every project for an admin, the caller's own for
// anyone else.
func (a *authService) ListProjects(ctx context.Context, req *minicloudv1.ListProjectsRequest) (*minicloudv1.ListProjectsResponse, error) {
	p := auth.FromContext(ctx)
	var err error
	resp := &minicloudv1.ListProjectsResponse{}
	// The token is bound to the caller: what SeesProject keeps differs.
	resp.Projects, resp.NextPageToken, err = listPage(ctx, a.s, "projects", store.ProjectPrefix, p.String(), req,
		func() *minicloudv1.Project { return &minicloudv1.Project{} },
		func(_ string, pr *minicloudv1.Project) bool { return p.SeesProject(pr.GetName()) })
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (a *authService) DeleteProject(ctx context.Context, req *minicloudv1.DeleteProjectRequest) (*minicloudv1.DeleteProjectResponse, error) {
	if err := validateName("project", req.GetName()); err != nil {
		return nil, err
	}
	if err := store.DeleteProject(ctx, a.s.etcd, req.GetName()); err != nil {
		return nil, err
	}
	return &minicloudv1.DeleteProjectResponse{}, nil
}

// binding validates a (project, role) pair: admin is global (no project),
// the other roles need one.
func binding(project, role string) (*minicloudv1.RoleBinding, error) {
	r := auth.Role(role)
	if !r.Valid() {
		return nil, errdefs.Invalid("role %q is not one of reader, member, admin", role)
	}
	if r == auth.RoleAdmin {
		if project != "" {
			return nil, errdefs.Invalid("the admin role is global: give no --project with it")
		}
		return &minicloudv1.RoleBinding{Role: role}, nil
	}
	if project == "" {
		return nil, errdefs.Invalid("role %s needs a project (--project)", role)
	}
	if err := validateName("project", project); err != nil {
		return nil, err
	}
	return &minicloudv1.RoleBinding{Project: project, Role: role}, nil
}

func tokenTTL(seconds int64) (time.Duration, error) {
	ttl := time.Duration(seconds) * time.Second
	switch {
	case seconds == 0:
		return DefaultTokenTTL, nil
	case seconds < 0 || ttl < MinTokenTTL || ttl > MaxTokenTTL:
		return 0, errdefs.Invalid("token lifetime %ds is out of range: give between %s and %s", seconds, MinTokenTTL, MaxTokenTTL)
	}
	return ttl, nil
}

func validateDescription(d string) error {
	if len(d) > maxDescription {
		return errdefs.Invalid("description is %d bytes; keep it under %d", len(d), maxDescription+1)
	}
	return nil
}

// newToken draws a token for user and the record stored of it.
func newToken(user string, ttl time.Duration, description string) (auth.TokenParts, *minicloudv1.Token, error) {
	parts, err := auth.NewToken(user)
	if err != nil {
		return auth.TokenParts{}, nil, errdefs.Internal("%v", err)
	}
	now := time.Now()
	return parts, &minicloudv1.Token{
		Id: parts.ID, User: user, Description: description,
		CreateTime: timestamppb.New(now), ExpireTime: timestamppb.New(now.Add(ttl)),
		SecretSha256: auth.HashSecret(parts.Secret),
	}, nil
}

// public is what may be shown of a stored token: everything but the hash.
func public(t *minicloudv1.Token) *minicloudv1.Token {
	return &minicloudv1.Token{Id: t.GetUser() + "." + t.GetId(), User: t.GetUser(), Description: t.GetDescription(),
		CreateTime: t.GetCreateTime(), ExpireTime: t.GetExpireTime()}
}

func (a *authService) CreateUser(ctx context.Context, req *minicloudv1.CreateUserRequest) (*minicloudv1.CreateUserResponse, error) {
	if err := validateName("user", req.GetName()); err != nil {
		return nil, err
	}
	b, err := binding(req.GetProject(), req.GetRole())
	if err != nil {
		return nil, err
	}
	ttl, err := tokenTTL(req.GetTokenTtlSeconds())
	if err != nil {
		return nil, err
	}
	parts, tok, err := newToken(req.GetName(), ttl, "first token of "+req.GetName())
	if err != nil {
		return nil, err
	}
	u := &minicloudv1.User{Name: req.GetName(), Roles: []*minicloudv1.RoleBinding{b}, CreateTime: timestamppb.Now()}
	if err := store.CreateUser(ctx, a.s.etcd, u, tok); err != nil {
		return nil, err
	}
	a.s.log.Info("user created", "user", u.GetName(), "role", b.GetRole(), "project", b.GetProject(), "token_id", parts.PublicID())
	return &minicloudv1.CreateUserResponse{User: u, Token: parts.String(), TokenInfo: public(tok)}, nil
}

func (a *authService) GetUser(ctx context.Context, req *minicloudv1.GetUserRequest) (*minicloudv1.User, error) {
	if err := validateName("user", req.GetName()); err != nil {
		return nil, err
	}
	u := &minicloudv1.User{}
	if _, err := store.Get(ctx, a.s.etcd, store.UserKey(req.GetName()), u); errdefs.IsNotFound(err) {
		return nil, errdefs.NotFound("user %s not found", req.GetName())
	} else if err != nil {
		return nil, err
	}
	return u, nil
}

func (a *authService) ListUsers(ctx context.Context, req *minicloudv1.ListUsersRequest) (*minicloudv1.ListUsersResponse, error) {
	users, next, err := listPage(ctx, a.s, "users", store.UserPrefix, "", req, func() *minicloudv1.User { return &minicloudv1.User{} }, nil)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.ListUsersResponse{Users: users, NextPageToken: next}, nil
}

func (a *authService) DeleteUser(ctx context.Context, req *minicloudv1.DeleteUserRequest) (*minicloudv1.DeleteUserResponse, error) {
	if err := validateName("user", req.GetName()); err != nil {
		return nil, err
	}
	if p := auth.FromContext(ctx); p.Name == req.GetName() {
		return nil, errdefs.FailedPrecondition("you cannot delete yourself (%s): ask another admin", p.Name)
	}
	ids, err := store.DeleteUser(ctx, a.s.etcd, req.GetName())
	if err != nil {
		return nil, err
	}
	a.s.creds.wrote(ctx)
	a.s.log.Info("user deleted", "user", req.GetName(), "revoked_tokens", ids)
	return &minicloudv1.DeleteUserResponse{RevokedTokens: ids}, nil
}

func (a *authService) GrantRole(ctx context.Context, req *minicloudv1.GrantRoleRequest) (*minicloudv1.User, error) {
	if err := validateName("user", req.GetUser()); err != nil {
		return nil, err
	}
	b, err := binding(req.GetProject(), req.GetRole())
	if err != nil {
		return nil, err
	}
	return a.updateUser(ctx, req.GetUser(), func(u *minicloudv1.User) error {
		u.Roles = slices.DeleteFunc(u.Roles, func(x *minicloudv1.RoleBinding) bool {
			return x.GetProject() == b.GetProject() || (b.GetRole() == string(auth.RoleAdmin) && x.GetRole() == b.GetRole())
		})
		if len(u.Roles) >= maxRoleBindings {
			return errdefs.ResourceExhausted("user %s already has %d roles, the most allowed", u.GetName(), len(u.Roles))
		}
		u.Roles = append(u.Roles, b)
		return nil
	})
}

// maxRoleBindings bounds a user's record.
const maxRoleBindings = 100

func (a *authService) RevokeRole(ctx context.Context, req *minicloudv1.RevokeRoleRequest) (*minicloudv1.User, error) {
	if err := validateName("user", req.GetUser()); err != nil {
		return nil, err
	}
	if req.GetProject() != "" {
		if err := validateName("project", req.GetProject()); err != nil {
			return nil, err
		}
	}
	if p := auth.FromContext(ctx); p.Name == req.GetUser() && req.GetProject() == "" {
		return nil, errdefs.FailedPrecondition("you cannot take your own admin role away: ask another admin")
	}
	return a.updateUser(ctx, req.GetUser(), func(u *minicloudv1.User) error {
		n := len(u.Roles)
		u.Roles = slices.DeleteFunc(u.Roles, func(x *minicloudv1.RoleBinding) bool { return x.GetProject() == req.GetProject() })
		if len(u.Roles) == n {
			what := "project " + req.GetProject()
			if req.GetProject() == "" {
				what = "the admin role"
			}
			return errdefs.NotFound("user %s has no role in %s", u.GetName(), what)
		}
		return nil
	})
}

// updateUser changes user's record; this server's next calls see the
// change (credCache.wrote).
func (a *authService) updateUser(ctx context.Context, user string, change func(*minicloudv1.User) error) (*minicloudv1.User, error) {
	u, err := store.UpdateUser(ctx, a.s.etcd, user, change)
	if err != nil {
		return nil, err
	}
	a.s.creds.wrote(ctx)
	return u, nil
}

// targetUser is the user a self-scoped call acts on: the caller, or (for
// an admin) the user it names.
func targetUser(ctx context.Context, named string) (string, error) {
	p := auth.FromContext(ctx)
	if named == "" || named == p.Name {
		return p.Name, nil
	}
	if !p.Admin {
		return "", errdefs.PermissionDenied("only an admin may act on another user's tokens")
	}
	if err := validateName("user", named); err != nil {
		return "", err
	}
	return named, nil
}

func (a *authService) CreateToken(ctx context.Context, req *minicloudv1.CreateTokenRequest) (*minicloudv1.CreateTokenResponse, error) {
	user, err := targetUser(ctx, req.GetUser())
	if err != nil {
		return nil, err
	}
	ttl, err := tokenTTL(req.GetTtlSeconds())
	if err != nil {
		return nil, err
	}
	if err := validateDescription(req.GetDescription()); err != nil {
		return nil, err
	}
	parts, tok, err := newToken(user, ttl, req.GetDescription())
	if err != nil {
		return nil, err
	}
	if err := store.CreateToken(ctx, a.s.etcd, tok, MaxTokensPerUser); err != nil {
		return nil, err
	}
	a.s.log.Info("token created", "user", user, "token_id", parts.PublicID(), "expires", tok.GetExpireTime().AsTime())
	return &minicloudv1.CreateTokenResponse{Token: parts.String(), Info: public(tok)}, nil
}

func (a *authService) ListTokens(ctx context.Context, req *minicloudv1.ListTokensRequest) (*minicloudv1.ListTokensResponse, error) {
	user := ""
	if !req.GetAllUsers() {
		var err error
		if user, err = targetUser(ctx, req.GetUser()); err != nil {
			return nil, err
		}
	}
	prefix := store.TokenPrefix
	if user != "" {
		prefix = store.UserTokensPrefix(user)
	}
	now := time.Now()
	toks, next, err := listPage(ctx, a.s, "tokens", prefix, "", req, func() *minicloudv1.Token { return &minicloudv1.Token{} },
		func(_ string, t *minicloudv1.Token) bool { return now.Before(t.GetExpireTime().AsTime()) })
	if err != nil {
		return nil, err
	}
	resp := &minicloudv1.ListTokensResponse{NextPageToken: next}
	for _, t := range toks {
		resp.Tokens = append(resp.Tokens, public(t))
	}
	return resp, nil
}

func (a *authService) RevokeToken(ctx context.Context, req *minicloudv1.RevokeTokenRequest) (*minicloudv1.RevokeTokenResponse, error) {
	user, id, ok := auth.ParsePublicID(strings.TrimSpace(req.GetId()))
	if !ok {
		return nil, errdefs.Invalid("%q is not a token id (<user>.<id>, as `minicloud token list` shows) nor a token", req.GetId())
	}
	if _, err := targetUser(ctx, user); err != nil {
		// Another user's token does not exist for a non-admin.
		return nil, errdefs.NotFound("token %s.%s not found", user, id)
	}
	if err := store.RevokeToken(ctx, a.s.etcd, user, id); err != nil {
		return nil, err
	}
	a.s.creds.wrote(ctx)
	a.s.log.Info("token revoked", "token_id", user+"."+id, "by", auth.FromContext(ctx).String())
	return &minicloudv1.RevokeTokenResponse{}, nil
}

func (a *authService) WhoAmI(ctx context.Context, _ *minicloudv1.WhoAmIRequest) (*minicloudv1.WhoAmIResponse, error) {
	p := auth.FromContext(ctx)
	resp := &minicloudv1.WhoAmIResponse{Kind: p.Kind.String(), Name: p.Name, Admin: p.Admin, DefaultProject: p.DefaultProject, TokenId: p.TokenID}
	for _, project := range slices.Sorted(maps.Keys(p.Projects)) {
		resp.Roles = append(resp.Roles, &minicloudv1.RoleBinding{Project: project, Role: string(p.Projects[project])})
	}
	if p.Admin {
		resp.Roles = append(resp.Roles, &minicloudv1.RoleBinding{Role: string(auth.RoleAdmin)})
	}
	if user, id, ok := auth.ParsePublicID(p.TokenID); ok {
		tok := &minicloudv1.Token{}
		if _, err := store.Get(ctx, a.s.etcd, store.TokenKey(user, id), tok); err == nil {
			resp.TokenExpireTime = tok.GetExpireTime()
		}
	}
	return resp, nil
}
