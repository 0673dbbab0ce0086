package server

import (
	"context"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

// noCredentials is what a caller without a token or certificate hears.
const noCredentials = "no credentials: send a bearer token (minicloud: --token, $MINICLOUD_TOKEN or `token:` in ~/.config/minicloud/config.yaml; " +
	"gRPC: metadata `authorization: Bearer mct_...`); `make up` writes an admin token to the config file, `minicloud token create` makes more"

// authenticate returns the principal of the call in ctx: the host or
// control-plane component its client certificate names (refused if the
// certificate was revoked), or the user its bearer token belongs to
// (refused if unknown, expired, revoked or the user is gone). nil, nil:
// the call carries neither.
func (s *Server) authenticate(ctx context.Context) (*auth.Principal, error) {
	if cert := pki.PeerCert(ctx); cert != nil {
		if err := s.checkRevoked(ctx); err != nil {
			return nil, err
		}
		switch {
		case pki.HasOrg(cert, pki.OrgHosts):
			return &auth.Principal{Kind: auth.KindHost, Name: cert.Subject.CommonName}, nil
		case pki.HasOrg(cert, pki.OrgControlPlane):
			return &auth.Principal{Kind: auth.KindControlPlane, Name: cert.Subject.CommonName}, nil
		}
		return nil, errdefs.Unauthenticated("certificate %q is neither a host's nor the control plane's", cert.Subject.CommonName)
	}
	// One header, not a copy of them all (FromIncomingContext).
	vals := metadata.ValueFromIncomingContext(ctx, "authorization")
	if len(vals) == 0 {
		return nil, nil
	}
	if len(vals) > 1 {
		return nil, errdefs.Unauthenticated("the call carries %d authorization headers: send one", len(vals))
	}
	raw, ok := strings.CutPrefix(vals[0], "Bearer ")
	if !ok {
		return nil, errdefs.Unauthenticated("authorization header is not `Bearer <token>`")
	}
	tok, ok := auth.ParseToken(strings.TrimSpace(raw))
	if !ok {
		return nil, errdefs.Unauthenticated("bearer token is malformed: a minicloud token looks like mct_<user>.<id>.<secret>")
	}
	// The cache answers while it is current; otherwise (and on a miss)
	// etcd does (credcache.go).
	token, cached, ok := s.creds.lookup(tok.User, tok.ID)
	var user *minicloudv1.User
	if ok {
		user = cached.user
	} else {
		creds, err := store.ReadCredentials(ctx, s.etcd, tok.User, tok.ID)
		if err != nil {
			return nil, err
		}
		token, user = creds.Token, creds.User
	}
	if token == nil || user == nil || !auth.SecretMatches(tok.Secret, token.GetSecretSha256()) {
		// One message for unknown, revoked, wrong secret and deleted
		// user: a guesser learns nothing about which part was wrong.
		return nil, invalidToken(tok)
	}
	if exp := token.GetExpireTime().AsTime(); !time.Now().Before(exp) {
		// The token's lease removes it from etcd soon after expiry; until
		// then the time decides, on every call, cached or not.
		return nil, invalidToken(tok)
	}
	if ok {
		p := *cached.principal // shared Projects: principals are read-only
		p.TokenID = tok.PublicID()
		return &p, nil
	}
	return userPrincipal(user, tok.PublicID()), nil
}

func invalidToken(tok auth.TokenParts) error {
	return errdefs.Unauthenticated("token %s is not valid (unknown, revoked or expired): get a new one with `minicloud token create`", tok.PublicID())
}

// userPrincipal builds the principal of user u.
func userPrincipal(u *minicloudv1.User, tokenID string) *auth.Principal {
	p := &auth.Principal{Kind: auth.KindUser, Name: u.GetName(), TokenID: tokenID, Projects: map[string]auth.Role{}}
	for _, b := range u.GetRoles() {
		r := auth.Role(b.GetRole())
		if r == auth.RoleAdmin {
			p.Admin = true
			continue
		}
		if b.GetProject() != "" && r.Valid() {
			p.Projects[b.GetProject()] = r
			if p.DefaultProject == "" {
				p.DefaultProject = b.GetProject()
			}
		}
	}
	if _, ok := p.Projects[defaultProject]; ok || (p.Admin && p.DefaultProject == "") {
		p.DefaultProject = defaultProject
	}
	return p
}

// authorize checks p may make the call method with request req (nil for a
// stream before its first message), and resolves an empty project in req
// to p's default project.
func (s *Server) authorize(ctx context.Context, method string, p *auth.Principal, req proto.Message) error {
	rule, ok := auth.RuleFor(method)
	if !ok {
		return errdefs.PermissionDenied("%s is not in the API's policy table: nobody may call it", method)
	}
	if rule.Scope == auth.ScopePublic {
		return nil
	}
	name := method[strings.LastIndex(method, "/")+1:]
	if p == nil {
		if rule.Scope == auth.ScopeHost {
			return errdefs.Unauthenticated("%s is for host agents: calls need the host's client certificate (join the host first: `minicloudd agent --join TOKEN --ca-hash HASH`, see docs/operations.md)", name)
		}
		return errdefs.Unauthenticated("%s", noCredentials)
	}
	if p.Kind == auth.KindHost && rule.Hosts {
		return nil
	}
	if rule.Scope == auth.ScopeHost {
		if p.Kind != auth.KindHost {
			return errdefs.PermissionDenied("%s is for host agents (a host certificate), not %s", name, p)
		}
		return nil
	}
	if p.Kind != auth.KindUser {
		return errdefs.PermissionDenied("%s needs a user's token; %s cannot call it", name, p)
	}
	if req != nil {
		for _, f := range rule.AdminFields {
			if fieldSet(req, f) && !p.Admin {
				return errdefs.PermissionDenied("%s with %s needs the admin role", name, f)
			}
		}
	}
	switch rule.Scope {
	case auth.ScopeSelf:
		return nil
	case auth.ScopeCluster:
		if rule.Role == auth.RoleAdmin && !p.Admin {
			return errdefs.PermissionDenied("%s needs the admin role; %s is not an admin", name, p)
		}
		return nil
	case auth.ScopeProject:
		if req == nil {
			return nil // decided on the first message
		}
		if fieldSet(req, "all_projects") {
			return nil // admin only, checked above
		}
		project, err := resolveProject(req, p)
		if err != nil {
			return err
		}
		if !p.SeesProject(project) {
			return errdefs.NotFound("project %s not found", project)
		}
		if p.Admin && project != defaultProject {
			// An admin sees every project; make sure this one exists.
			if _, err := store.Get(ctx, s.etcd, store.ProjectKey(project), &minicloudv1.Project{}); errdefs.IsNotFound(err) {
				return errdefs.NotFound("project %s not found: create it first (minicloud project create %s)", project, project)
			} else if err != nil {
				return err
			}
		}
		if !p.Can(project, rule.Role) {
			r, _ := p.RoleIn(project)
			return errdefs.PermissionDenied("%s needs the %s role in project %s; %s is %s there", name, rule.Role, project, p, r)
		}
		for _, f := range rule.MemberFields {
			if headerFieldSet(req, f) && !p.Can(project, auth.RoleMember) {
				r, _ := p.RoleIn(project)
				return errdefs.PermissionDenied("%s with %s needs the member role in project %s; %s is %s there", name, f, project, p, r)
			}
		}
		return nil
	}
	return errdefs.Internal("policy rule for %s has no scope", method)
}

// resolveProject returns the project req names, writing p's default
// project into it when it names none, so handlers act in the project that
// was authorized.
func resolveProject(req proto.Message, p *auth.Principal) (string, error) {
	m, fd := projectField(req.ProtoReflect())
	if fd == nil {
		return "", errdefs.Invalid("%s names no project: a stream's first message must be its header", req.ProtoReflect().Descriptor().FullName())
	}
	project := m.Get(fd).String()
	if project == "" {
		if p.DefaultProject == "" {
			return "", errdefs.FailedPrecondition("%s has no role in any project: name one with --project, or ask an admin for a role (minicloud user grant)", p)
		}
		project = p.DefaultProject
		m.Set(fd, protoreflect.ValueOfString(project))
	}
	if _, err := projectOf(project); err != nil {
		return "", err
	}
	return project, nil
}

// projectField finds the `project` string field of m, or of the message
// set in one of m's oneofs (a stream's header message).
func projectField(m protoreflect.Message) (protoreflect.Message, protoreflect.FieldDescriptor) {
	if fd := m.Descriptor().Fields().ByName("project"); fd != nil && fd.Kind() == protoreflect.StringKind {
		return m, fd
	}
	oneofs := m.Descriptor().Oneofs()
	for i := range oneofs.Len() {
		if fd := m.WhichOneof(oneofs.Get(i)); fd != nil && fd.Message() != nil {
			if inner := m.Get(fd).Message(); inner.Descriptor().Fields().ByName("project") != nil {
				return projectField(inner)
			}
		}
	}
	return m, nil
}

// headerFieldSet is fieldSet on req or, for a stream's first message, on
// the header set in its oneof (the message projectField found).
func headerFieldSet(req proto.Message, name string) bool {
	m, _ := projectField(req.ProtoReflect())
	fd := m.Descriptor().Fields().ByName(protoreflect.Name(name))
	return fd != nil && m.Has(fd)
}

// fieldSet says whether req has field name set to a non-zero value.
func fieldSet(req proto.Message, name string) bool {
	m := req.ProtoReflect()
	fd := m.Descriptor().Fields().ByName(protoreflect.Name(name))
	return fd != nil && m.Has(fd)
}

func (s *Server) authUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	p, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	msg, _ := req.(proto.Message)
	if msg == nil {
		return nil, errdefs.Internal("request of %s is not a protobuf message", info.FullMethod)
	}
	err = s.authorize(ctx, info.FullMethod, p, msg)
	noteAudit(ctx, p, msg)
	if err != nil {
		return nil, err
	}
	return handler(auth.NewContext(ctx, p), req)
}

func (s *Server) authStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	p, err := s.authenticate(ctx)
	if err != nil {
		return err
	}
	noteAudit(ctx, p, nil)
	if err := s.authorize(ctx, info.FullMethod, p, nil); err != nil {
		return err
	}
	return handler(srv, &authStream{ServerStream: ss, s: s, method: info.FullMethod, p: p, ctx: auth.NewContext(ctx, p)})
}

// authStream authorizes a stream's first message (a project-scoped stream
// names its project there: a watch's request, an upload's header) before
// the handler sees it.
type authStream struct {
	grpc.ServerStream
	s          *Server
	method     string
	p          *auth.Principal
	ctx        context.Context
	authorized bool
}

func (a *authStream) Context() context.Context { return a.ctx }

func (a *authStream) RecvMsg(m any) error {
	if err := a.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if a.authorized {
		return nil
	}
	msg, ok := m.(proto.Message)
	if !ok {
		return errdefs.Internal("message of %s is not a protobuf message", a.method)
	}
	err := a.s.authorize(a.ctx, a.method, a.p, msg)
	noteAudit(a.ctx, nil, msg)
	if err != nil {
		return err
	}
	a.authorized = true
	return nil
}
