package auth

import (
	"fmt"
	"sort"
	"strings"
)

// Scope says whose permission a call needs.
type Scope int

const (
	// ScopeProject: a user with at least Rule.Role in the project the
	// request names (its `project` field; empty means the caller's default
	// project). A project the caller has no role in does not exist for it:
	// NotFound, never PermissionDenied.
	ScopeProject Scope = iota + 1
	// ScopeCluster: a user with at least Rule.Role anywhere (reader: any
	// user; admin: an admin). For cluster-wide objects: flavors, hosts,
	// projects, users.
	ScopeCluster
	// ScopeSelf: any user, acting on itself (its tokens, who it is); the
	// handler refuses acting on another user unless the caller is admin.
	ScopeSelf
	// ScopeHost: a host's agent (a host certificate); the handler binds the
	// call to the host the certificate names.
	ScopeHost
	// ScopePublic: no credentials; the request carries its own proof (a
	// join token).
	ScopePublic
)

// Rule is what one RPC needs.
type Rule struct {
	Scope Scope
	Role  Role
	// Hosts lets host agents make the call too (they fetch the images of
	// the VMs they run, in any project).
	Hosts bool
	// AdminFields are request fields only an admin may set (all_projects,
	// a host filter): set by anyone else, the call is PermissionDenied.
	AdminFields []string
	// MemberFields are request fields (of the request, or of a stream's
	// header) that need the member role when set: a reader may watch a
	// console, a member may type into it.
	MemberFields []string
}

func project(r Role) Rule { return Rule{Scope: ScopeProject, Role: r} }
func cluster(r Role) Rule { return Rule{Scope: ScopeCluster, Role: r} }

var (
	self   = Rule{Scope: ScopeSelf}
	host   = Rule{Scope: ScopeHost}
	public = Rule{Scope: ScopePublic}
)

const (
	vm     = "/minicloud.v1.VMService/"
	flavor = "/minicloud.v1.FlavorService/"
	netw   = "/minicloud.v1.NetworkService/"
	sg     = "/minicloud.v1.ServerGroupService/"
	hosts  = "/minicloud.v1.HostService/"
	image  = "/minicloud.v1.ImageService/"
	authn  = "/minicloud.v1.AuthService/"
	ident  = "/minicloud.v1.IdentityService/"
	quota  = "/minicloud.v1.QuotaService/"
)

// Policy is the one table of what every RPC of the API needs, keyed by
// full method name. A method missing here is refused (TestPolicyCoversEveryRPC
// keeps the table complete). docs/security.md renders it.
var Policy = map[string]Rule{
	vm + "CreateVM":         project(RoleMember),
	vm + "GetVM":            project(RoleReader),
	vm + "ListVMs":          {Scope: ScopeProject, Role: RoleReader, AdminFields: []string{"all_projects", "host"}},
	vm + "DeleteVM":         {Scope: ScopeProject, Role: RoleMember, AdminFields: []string{"force"}},
	vm + "StartVM":          project(RoleMember),
	vm + "StopVM":           project(RoleMember),
	vm + "RebootVM":         project(RoleMember),
	vm + "WatchVMs":         {Scope: ScopeProject, Role: RoleReader, AdminFields: []string{"all_projects"}},
	vm + "GetConsoleLog":    project(RoleReader),
	vm + "ListVMEvents":     project(RoleReader),
	vm + "UpdateVMMetadata": project(RoleMember),
	vm + "ExposeVMPort":     project(RoleMember),
	vm + "UnexposeVMPort":   project(RoleMember),
	// Watching a console is reading; typing into it acts on the VM.
	vm + "AttachConsole": {Scope: ScopeProject, Role: RoleReader, MemberFields: []string{"write", "take_over"}},
	vm + "GetVMStats":    project(RoleReader),

	flavor + "CreateFlavor": cluster(RoleAdmin),
	flavor + "GetFlavor":    cluster(RoleReader),
	flavor + "ListFlavors":  cluster(RoleReader),
	flavor + "DeleteFlavor": cluster(RoleAdmin),

	netw + "CreateNetwork": project(RoleMember),
	netw + "GetNetwork":    project(RoleReader),
	netw + "ListNetworks":  project(RoleReader),
	netw + "DeleteNetwork": project(RoleMember),

	sg + "CreateServerGroup": project(RoleMember),
	sg + "GetServerGroup":    project(RoleReader),
	sg + "ListServerGroups":  project(RoleReader),
	sg + "DeleteServerGroup": project(RoleMember),

	hosts + "RegisterHost":      host,
	hosts + "Heartbeat":         host,
	hosts + "WatchAssignments":  host,
	hosts + "ReportVMStatus":    host,
	hosts + "WatchNetworkPorts": host,
	hosts + "JoinHost":          public,
	// A host may ask for identity tokens only for its own VMs (the
	// handler checks the VM's host against the certificate).
	hosts + "IssueIdentityToken": host,
	hosts + "ListHosts":          cluster(RoleAdmin),
	hosts + "GetHost":            cluster(RoleAdmin),
	hosts + "DisableHost":        cluster(RoleAdmin),
	hosts + "EnableHost":         cluster(RoleAdmin),
	hosts + "CreateJoinToken":    cluster(RoleAdmin),
	hosts + "ListJoinTokens":     cluster(RoleAdmin),
	hosts + "DeleteJoinToken":    cluster(RoleAdmin),
	hosts + "RevokeHost":         cluster(RoleAdmin),
	hosts + "FenceHost":          cluster(RoleAdmin),
	hosts + "EvacuateHost":       cluster(RoleAdmin),
	hosts + "DeleteHost":         cluster(RoleAdmin),

	// Images belong to a project (private) or are public; agents fetch
	// the images of the VMs they run, whatever their project.
	image + "CreateImage":        project(RoleMember),
	image + "GetImage":           {Scope: ScopeProject, Role: RoleReader, Hosts: true},
	image + "ListImages":         project(RoleReader),
	image + "DeleteImage":        project(RoleMember),
	image + "DownloadImage":      {Scope: ScopeProject, Role: RoleReader, Hosts: true},
	image + "SetImageVisibility": cluster(RoleAdmin),

	quota + "GetQuota": project(RoleReader),
	quota + "SetQuota": cluster(RoleAdmin),

	authn + "CreateProject": cluster(RoleAdmin),
	authn + "GetProject":    cluster(RoleReader),
	authn + "ListProjects":  cluster(RoleReader),
	authn + "DeleteProject": cluster(RoleAdmin),
	authn + "CreateUser":    cluster(RoleAdmin),
	authn + "GetUser":       cluster(RoleAdmin),
	authn + "ListUsers":     cluster(RoleAdmin),
	authn + "DeleteUser":    cluster(RoleAdmin),
	authn + "GrantRole":     cluster(RoleAdmin),
	authn + "RevokeRole":    cluster(RoleAdmin),
	authn + "CreateToken":   self,
	authn + "ListTokens":    {Scope: ScopeSelf, AdminFields: []string{"all_users"}},
	authn + "RevokeToken":   self,
	authn + "WhoAmI":        self,

	// The verification keys are public (also on the API's HTTP listener
	// without a token); any authenticated caller may read them.
	"/minicloud.v1.AuditService/ListAuditRecords": cluster(RoleAdmin),

	ident + "GetJWKS": {Scope: ScopeCluster, Role: RoleReader, Hosts: true},
}

// Services outside minicloud's own: grpc.health.v1 tells only whether a
// replica serves (a client's load balancer asks before any call), so it is
// public; reflection describes the API to any user (grpcurl).
var otherServices = map[string]Rule{
	"grpc.health.v1.Health":                    public,
	"grpc.reflection.v1.ServerReflection":      self,
	"grpc.reflection.v1alpha.ServerReflection": self,
}

// RuleFor returns the rule of the RPC method ("/package.Service/Method");
// ok is false when no rule covers it (refuse the call).
func RuleFor(method string) (Rule, bool) {
	if r, ok := Policy[method]; ok {
		return r, true
	}
	service, _, _ := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	r, ok := otherServices[service]
	return r, ok
}

// MarkdownPolicyTable renders Policy as the table docs/security.md carries
// between its "policy table" markers.
func MarkdownPolicyTable() string {
	var b strings.Builder
	b.WriteString("| RPC | who may call it |\n|---|---|\n")
	names := make([]string, 0, len(Policy))
	for n := range Policy {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		r := Policy[n]
		var who string
		switch r.Scope {
		case ScopeProject:
			who = string(r.Role) + " in the request's project"
		case ScopeCluster:
			if r.Role == RoleAdmin {
				who = "admin"
			} else {
				who = "any user"
			}
		case ScopeSelf:
			who = "any user, for itself (admin: for anyone)"
		case ScopeHost:
			who = "a host, for itself (host certificate)"
		case ScopePublic:
			who = "anyone (the request carries its own proof)"
		}
		if r.Hosts {
			who += "; hosts"
		}
		if len(r.AdminFields) > 0 {
			who += "; admin only with " + strings.Join(r.AdminFields, ", ")
		}
		if len(r.MemberFields) > 0 {
			who += "; member with " + strings.Join(r.MemberFields, ", ")
		}
		fmt.Fprintf(&b, "| `%s` | %s |\n", strings.TrimPrefix(n, "/minicloud.v1."), who)
	}
	return b.String()
}

// Audited says whether calls of method go to the audit log: every call
// that may change something, except the host agents' own (heartbeats and
// status reports every few seconds are the hosts' reports, kept as VM
// events, not actions of a person).
func Audited(method string) bool {
	verb := method[strings.LastIndex(method, "/")+1:]
	for _, read := range []string{"Get", "List", "Watch", "Download", "WhoAmI"} {
		if strings.HasPrefix(verb, read) {
			return false
		}
	}
	r, ok := RuleFor(method)
	return !ok || r.Scope != ScopeHost
}
