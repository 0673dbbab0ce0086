package server_test

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

// methods lists every RPC the server serves, with its descriptor.
func (e *env) methods(t *testing.T) map[string]protoreflect.MethodDescriptor {
	t.Helper()
	out := map[string]protoreflect.MethodDescriptor{}
	for svc, info := range e.srv.GRPCServer().GetServiceInfo() {
		if !strings.HasPrefix(svc, "minicloud.") {
			continue
		}
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(svc))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range info.Methods {
			out["/"+svc+"/"+m.Name] = d.(protoreflect.ServiceDescriptor).Methods().ByName(protoreflect.Name(m.Name))
		}
	}
	return out
}

// TestPolicyCoversEveryRPC: every RPC has a rule; a project-scoped
// request has a project field; admin-only fields exist.
func TestPolicyCoversEveryRPC(t *testing.T) {
	e := newEnv(t)
	methods := e.methods(t)
	for name, md := range methods {
		rule, ok := auth.RuleFor(name)
		if !ok {
			t.Errorf("%s has no rule in auth.Policy", name)
			continue
		}
		in := md.Input()
		if rule.Scope == auth.ScopeProject && !hasProject(in) {
			t.Errorf("%s is project-scoped but %s has no project field", name, in.FullName())
		}
		for _, f := range rule.AdminFields {
			if in.Fields().ByName(protoreflect.Name(f)) == nil {
				t.Errorf("%s: admin field %s is not a field of %s", name, f, in.FullName())
			}
		}
		for _, f := range rule.MemberFields {
			if !hasHeaderField(in, f) {
				t.Errorf("%s: member field %s is not a field of %s or of its header", name, f, in.FullName())
			}
		}
	}
	// Independently of the table: readers may only get, list and watch
	// (console logs included); everything else a user does in a project
	// needs member; cluster-wide changes need admin.
	for name, rule := range auth.Policy {
		verb := name[strings.LastIndex(name, "/")+1:]
		reads := strings.HasPrefix(verb, "Get") || strings.HasPrefix(verb, "List") || strings.HasPrefix(verb, "Watch") || verb == "DownloadImage"
		switch {
		case rule.Scope == auth.ScopeProject && reads && rule.Role != auth.RoleReader:
			t.Errorf("%s reads, yet needs %s", name, rule.Role)
		case rule.Scope == auth.ScopeProject && !reads && rule.Role == auth.RoleReader && len(rule.MemberFields) > 0:
			// Reads unless the request asks to act (a console's write).
		case rule.Scope == auth.ScopeProject && !reads && rule.Role != auth.RoleMember:
			t.Errorf("%s changes a project's objects: it must need member, not %s", name, rule.Role)
		case rule.Scope == auth.ScopeCluster && !reads && rule.Role != auth.RoleAdmin:
			t.Errorf("%s changes cluster-wide objects: it must need admin, not %s", name, rule.Role)
		}
	}
	for name := range auth.Policy {
		if _, ok := methods[name]; !ok {
			t.Errorf("policy names %s, which the server does not serve", name)
		}
	}
}

// hasHeaderField says whether m, or the message of one of its oneof fields
// (a stream's header), has a field name.
func hasHeaderField(m protoreflect.MessageDescriptor, name string) bool {
	if m.Fields().ByName(protoreflect.Name(name)) != nil {
		return true
	}
	for i := range m.Oneofs().Len() {
		fs := m.Oneofs().Get(i).Fields()
		for j := range fs.Len() {
			if md := fs.Get(j).Message(); md != nil && md.Fields().ByName(protoreflect.Name(name)) != nil {
				return true
			}
		}
	}
	return false
}

// hasProject says whether a request names a project: in a field, or in
// the header message of a stream (a oneof's message field).
func hasProject(m protoreflect.MessageDescriptor) bool {
	if m.Fields().ByName("project") != nil {
		return true
	}
	for i := range m.Oneofs().Len() {
		fs := m.Oneofs().Get(i).Fields()
		for j := range fs.Len() {
			if fm := fs.Get(j).Message(); fm != nil && fm.Fields().ByName("project") != nil {
				return true
			}
		}
	}
	return false
}

// call makes one RPC with an empty request (plus the project, if given)
// over conn and returns its status.
func call(conn *grpc.ClientConn, name string, md protoreflect.MethodDescriptor, project string) *status.Status {
	mt, err := protoregistry.GlobalTypes.FindMessageByName(md.Input().FullName())
	if err != nil {
		return status.New(codes.Internal, err.Error())
	}
	req := mt.New()
	if fd := md.Input().Fields().ByName("project"); fd != nil && project != "" {
		req.Set(fd, protoreflect.ValueOfString(project))
	}
	// A stream that names its project in a header message gets one.
	for i := range md.Input().Oneofs().Len() {
		fs := md.Input().Oneofs().Get(i).Fields()
		for j := range fs.Len() {
			if fm := fs.Get(j).Message(); fm != nil && fm.Fields().ByName("project") != nil {
				header := req.NewField(fs.Get(j)).Message()
				if project != "" {
					header.Set(fm.Fields().ByName("project"), protoreflect.ValueOfString(project))
				}
				req.Set(fs.Get(j), protoreflect.ValueOfMessage(header))
			}
		}
	}
	out, _ := protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName())
	// A watch the policy admits sends what it has and then waits: the
	// deadline ends it, and the answer so far is what counts.
	c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if !md.IsStreamingClient() && !md.IsStreamingServer() {
		return status.Convert(conn.Invoke(c, name, req.Interface(), out.New().Interface()))
	}
	st, err := conn.NewStream(c, &grpc.StreamDesc{ServerStreams: md.IsStreamingServer(), ClientStreams: md.IsStreamingClient()}, name)
	if err != nil {
		return status.Convert(err)
	}
	if err := st.SendMsg(req.Interface()); err != nil && err != io.EOF {
		return status.Convert(err)
	}
	_ = st.CloseSend()
	err = st.RecvMsg(out.New().Interface())
	if err == io.EOF {
		err = nil
	}
	return status.Convert(err)
}

// deniedByPolicy says whether st is the policy refusing a call (as opposed
// to the handler refusing an empty request).
func deniedByPolicy(st *status.Status) bool {
	if st.Code() == codes.Unauthenticated {
		return !strings.Contains(st.Message(), "join token") // JoinHost's own proof
	}
	m := st.Message()
	return st.Code() == codes.PermissionDenied &&
		(strings.Contains(m, " role") || strings.Contains(m, "is for host agents") || strings.Contains(m, "needs a user's token") || strings.Contains(m, "not in the API's policy"))
}

// TestAuthorizationMatrix calls every RPC as every kind of caller and
// checks the outcome against the policy table: a refused call is refused
// with the right code and changes nothing in etcd.
func TestAuthorizationMatrix(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createProjects("alpha", "beta")
	authc := minicloudv1.NewAuthServiceClient(e.conn)
	mkUser := func(name, project, role string, ttl time.Duration) string {
		resp, err := authc.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: name, Project: project, Role: role, TokenTtlSeconds: int64(ttl.Seconds())})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Token
	}
	reader := mkUser("rita", "alpha", "reader", time.Hour)
	member := mkUser("mia", "alpha", "member", time.Hour)
	expiring := mkUser("eve", "alpha", "member", time.Minute)
	revoked := mkUser("rob", "alpha", "member", time.Hour)
	if _, err := minicloudv1.NewAuthServiceClient(e.userConn(revoked)).RevokeToken(ctx(t), &minicloudv1.RevokeTokenRequest{Id: revoked}); err != nil {
		t.Fatal(err)
	}
	gone := mkUser("gus", "alpha", "member", time.Hour)
	if _, err := authc.DeleteUser(ctx(t), &minicloudv1.DeleteUserRequest{Name: "gus"}); err != nil {
		t.Fatal(err)
	}
	// Expire eve's token without waiting a minute: rewrite its record.
	toks, err := store.ListTokens(ctx(t), e.etcd, "eve")
	if err != nil || len(toks) != 1 {
		t.Fatalf("eve's tokens: %v %v", toks, err)
	}
	toks[0].ExpireTime = toks[0].CreateTime
	if v, err := store.Marshal(toks[0]); err != nil {
		t.Fatal(err)
	} else if _, err := e.etcd.Put(ctx(t), store.TokenKey("eve", toks[0].Id), v); err != nil {
		t.Fatal(err)
	}
	forged := "mct_mia.aaaaaaaa." + strings.Repeat("b", 32)

	type caller struct {
		name    string
		conn    *grpc.ClientConn
		project string // the project named in requests ("" = default)
		// want returns "" when the policy admits the call, or the code
		// the policy refuses it with.
		want func(auth.Rule) codes.Code
	}
	unauth := func(auth.Rule) codes.Code { return codes.Unauthenticated }
	userWant := func(role auth.Role, admin bool, ownProject bool) func(auth.Rule) codes.Code {
		return func(r auth.Rule) codes.Code {
			switch r.Scope {
			case auth.ScopePublic, auth.ScopeSelf:
				return codes.OK
			case auth.ScopeHost:
				return codes.PermissionDenied
			case auth.ScopeCluster:
				if r.Role == auth.RoleAdmin && !admin {
					return codes.PermissionDenied
				}
				return codes.OK
			case auth.ScopeProject:
				if !ownProject && !admin {
					return codes.NotFound
				}
				if !admin && !role.Includes(r.Role) {
					return codes.PermissionDenied
				}
				return codes.OK
			}
			return codes.Internal
		}
	}
	callers := []caller{
		{"no token", e.userConn(""), "", func(r auth.Rule) codes.Code {
			if r.Scope == auth.ScopePublic {
				return codes.OK
			}
			return codes.Unauthenticated
		}},
		{"forged token", e.userConn(forged), "", unauth},
		{"expired token", e.userConn(expiring), "", unauth},
		{"revoked token", e.userConn(revoked), "", unauth},
		{"deleted user's token", e.userConn(gone), "", unauth},
		{"reader", e.userConn(reader), "", userWant(auth.RoleReader, false, true)},
		{"member", e.userConn(member), "", userWant(auth.RoleMember, false, true)},
		{"member naming another project", e.userConn(member), "beta", userWant(auth.RoleMember, false, false)},
		{"admin", e.conn, "beta", userWant(auth.RoleAdmin, true, true)},
		{"host", e.hostConn("h1"), "", func(r auth.Rule) codes.Code {
			if r.Scope == auth.ScopeHost || r.Scope == auth.ScopePublic || r.Hosts {
				return codes.OK
			}
			return codes.PermissionDenied
		}},
	}
	methods := e.methods(t)
	for _, c := range callers {
		t.Run(c.name, func(t *testing.T) {
			for name, md := range methods {
				rule, _ := auth.RuleFor(name)
				want := c.want(rule)
				before := e.dump(t)
				got := call(c.conn, name, md, c.project)
				switch {
				case want == codes.OK:
					if deniedByPolicy(got) {
						t.Errorf("%s: refused (%v %s), the policy admits it", name, got.Code(), got.Message())
					}
				case got.Code() != want:
					t.Errorf("%s: got %v (%s), want %v", name, got.Code(), got.Message(), want)
				default:
					if want == codes.NotFound && !strings.Contains(got.Message(), "project beta not found") {
						t.Errorf("%s: %q does not say the project is not found", name, got.Message())
					}
					e.wantUnchanged(t, before)
				}
			}
		})
	}
}

// TestTokenLifecycle: a token works until revoked; a deleted user's tokens
// stop at once; secrets are never listed; bounds hold.
func TestTokenLifecycle(t *testing.T) {
	e := newEnv(t)
	e.createProjects("alpha")
	authc := minicloudv1.NewAuthServiceClient(e.conn)
	resp, err := authc.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: "ann", Project: "alpha", Role: "member"})
	if err != nil {
		t.Fatal(err)
	}
	ann := minicloudv1.NewAuthServiceClient(e.userConn(resp.Token))
	who, err := ann.WhoAmI(ctx(t), &minicloudv1.WhoAmIRequest{})
	if err != nil || who.Name != "ann" || who.DefaultProject != "alpha" || who.Admin || who.TokenExpireTime == nil {
		t.Fatalf("whoami: %v %v", who, err)
	}
	second, err := ann.CreateToken(ctx(t), &minicloudv1.CreateTokenRequest{Description: "ci", TtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	list, err := ann.ListTokens(ctx(t), &minicloudv1.ListTokensRequest{})
	if err != nil || len(list.Tokens) != 2 {
		t.Fatalf("list: %v %v", list, err)
	}
	for _, tk := range list.Tokens {
		if len(tk.SecretSha256) != 0 || strings.Contains(fmt.Sprint(tk), strings.Split(second.Token, ".")[2]) {
			t.Fatalf("listed token shows its secret or hash: %v", tk)
		}
	}
	_, err = ann.CreateToken(ctx(t), &minicloudv1.CreateTokenRequest{User: "admin"})
	wantCode(t, err, codes.PermissionDenied, "only an admin")
	_, err = ann.RevokeToken(ctx(t), &minicloudv1.RevokeTokenRequest{Id: "admin.abcdefgh"})
	wantCode(t, err, codes.NotFound, "not found")
	_, err = ann.CreateToken(ctx(t), &minicloudv1.CreateTokenRequest{TtlSeconds: 400 * 24 * 3600})
	wantCode(t, err, codes.InvalidArgument, "out of range")

	two := minicloudv1.NewAuthServiceClient(e.userConn(second.Token))
	if _, err := ann.RevokeToken(ctx(t), &minicloudv1.RevokeTokenRequest{Id: second.Info.Id}); err != nil {
		t.Fatal(err)
	}
	_, err = two.WhoAmI(ctx(t), &minicloudv1.WhoAmIRequest{})
	wantCode(t, err, codes.Unauthenticated, "not valid")
	if _, err := authc.DeleteUser(ctx(t), &minicloudv1.DeleteUserRequest{Name: "ann"}); err != nil {
		t.Fatal(err)
	}
	_, err = ann.WhoAmI(ctx(t), &minicloudv1.WhoAmIRequest{})
	wantCode(t, err, codes.Unauthenticated, "not valid")
	if n, _ := e.etcd.Get(ctx(t), store.UserTokensPrefix("ann"), clientv3.WithPrefix(), clientv3.WithCountOnly()); n.Count != 0 {
		t.Fatalf("deleted user keeps %d tokens in etcd", n.Count)
	}

	// A project with a user bound to it, or with objects, stays.
	if _, err := authc.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: "bo", Project: "alpha", Role: "reader"}); err != nil {
		t.Fatal(err)
	}
	_, err = authc.DeleteProject(ctx(t), &minicloudv1.DeleteProjectRequest{Name: "alpha"})
	wantCode(t, err, codes.FailedPrecondition, "user bo has a role in project alpha")
	if _, err := authc.RevokeRole(ctx(t), &minicloudv1.RevokeRoleRequest{User: "bo", Project: "alpha"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "n1", Project: "alpha", Cidr: "10.7.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	_, err = authc.DeleteProject(ctx(t), &minicloudv1.DeleteProjectRequest{Name: "alpha"})
	wantCode(t, err, codes.FailedPrecondition, "still has 1 networks")
	if _, err := e.nets.DeleteNetwork(ctx(t), &minicloudv1.DeleteNetworkRequest{Name: "n1", Project: "alpha"}); err != nil {
		t.Fatal(err)
	}
	// Images are keyed by name; their owner is in the record.
	img, _ := store.Marshal(&minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Id: "i1", Name: "img1", Project: "alpha"}})
	if _, err := e.etcd.Put(ctx(t), store.ImageKey("img1"), img); err != nil {
		t.Fatal(err)
	}
	_, err = authc.DeleteProject(ctx(t), &minicloudv1.DeleteProjectRequest{Name: "alpha"})
	wantCode(t, err, codes.FailedPrecondition, "still owns 1 images")
	if _, err := e.etcd.Delete(ctx(t), store.ImageKey("img1")); err != nil {
		t.Fatal(err)
	}
	if _, err := authc.DeleteProject(ctx(t), &minicloudv1.DeleteProjectRequest{Name: "alpha"}); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{store.QuotaUsageKey("alpha"), store.QuotaLimitsKey("alpha")} {
		if n, _ := e.etcd.Get(ctx(t), k, clientv3.WithCountOnly()); n.Count != 0 {
			t.Fatalf("%s outlives its project", k)
		}
	}
	_, err = e.nets.ListNetworks(ctx(t), &minicloudv1.ListNetworksRequest{Project: "alpha"})
	wantCode(t, err, codes.NotFound, "project alpha not found")
	_, err = authc.DeleteUser(ctx(t), &minicloudv1.DeleteUserRequest{Name: "admin"})
	wantCode(t, err, codes.FailedPrecondition, "cannot delete yourself")
}

// TestConsoleWriteNeedsMember: a reader may watch a console but not type
// into it; the header's write and take_over fields decide.
func TestConsoleWriteNeedsMember(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createProjects("alpha")
	authc := minicloudv1.NewAuthServiceClient(e.conn)
	resp, err := authc.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: "rita", Project: "alpha", Role: "reader", TokenTtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	vms := minicloudv1.NewVMServiceClient(e.userConn(resp.Token))
	attach := func(a *minicloudv1.ConsoleAttach) error {
		stream, err := vms.AttachConsole(ctx(t))
		if err != nil {
			return err
		}
		if err := stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Attach{Attach: a}}); err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	}
	wantCode(t, attach(&minicloudv1.ConsoleAttach{Name: "web1", Write: true}), codes.PermissionDenied, "AttachConsole with write needs the member role in project alpha")
	wantCode(t, attach(&minicloudv1.ConsoleAttach{Name: "web1", TakeOver: true}), codes.PermissionDenied, "with take_over needs the member role")
	// Watching passes authorization: the VM is what is missing.
	wantCode(t, attach(&minicloudv1.ConsoleAttach{Name: "web1"}), codes.NotFound, "web1")
}
