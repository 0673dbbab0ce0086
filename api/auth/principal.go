// Package auth says who is calling the API and what they may do: the
// principal behind a call (a user with a bearer token, a host or a
// control-plane component with a certificate of the cluster CA), the roles
// a user holds in projects, and the one table of which role each RPC needs
// (policy.go). The API server authenticates every call in an interceptor
// and puts the principal in the call's context; handlers and other
// interceptors (audit, quotas) read it back with FromContext.
package auth

import (
	"context"
	"slices"
)

// Role is what a user may do in a project. Roles are ordered: each
// includes everything the ones before it allow.
type Role string

const (
	// RoleReader may get, list and watch, and read console logs.
	RoleReader Role = "reader"
	// RoleMember may also create and manage VMs, networks, private images
	// and server groups.
	RoleMember Role = "member"
	// RoleAdmin may do everything in every project: hosts, flavors, public
	// images, quotas, projects and users. An admin binding is global.
	RoleAdmin Role = "admin"
)

// Roles lists the roles from least to most powerful.
var Roles = []Role{RoleReader, RoleMember, RoleAdmin}

// Valid says whether r is one of Roles.
func (r Role) Valid() bool { return slices.Contains(Roles, r) }

// Includes says whether r allows everything need allows.
func (r Role) Includes(need Role) bool {
	return slices.Index(Roles, r) >= slices.Index(Roles, need) && need.Valid() && r.Valid()
}

// Kind is what sort of caller a principal is.
type Kind int

const (
	// KindUser is a person or a program with a bearer token.
	KindUser Kind = iota + 1
	// KindHost is a hypervisor host's agent with a host certificate.
	KindHost
	// KindControlPlane is an API server or scheduler with a control-plane
	// certificate.
	KindControlPlane
)

func (k Kind) String() string {
	switch k {
	case KindUser:
		return "user"
	case KindHost:
		return "host"
	case KindControlPlane:
		return "control-plane"
	}
	return "unknown"
}

// Principal is the authenticated caller of one API call.
type Principal struct {
	Kind Kind
	// Name is the user's or the host's name (a certificate's common name).
	Name string
	// TokenID is the public id of the bearer token used ("" for
	// certificates): safe to log and audit, never the secret.
	TokenID string
	// Admin is true for a user holding the admin role.
	Admin bool
	// Projects maps each project the user has a role in to that role.
	Projects map[string]Role
	// DefaultProject is the project a call that names none acts in.
	DefaultProject string
}

// String names the principal for logs and audit records: "user alice",
// "host hv1".
func (p *Principal) String() string {
	if p == nil {
		return "anonymous"
	}
	return p.Kind.String() + " " + p.Name
}

// RoleIn returns the principal's role in project (admin everywhere for an
// admin) and whether it has one.
func (p *Principal) RoleIn(project string) (Role, bool) {
	if p == nil || p.Kind != KindUser {
		return "", false
	}
	if p.Admin {
		return RoleAdmin, true
	}
	r, ok := p.Projects[project]
	return r, ok
}

// Can says whether the principal holds at least need in project.
func (p *Principal) Can(project string, need Role) bool {
	r, ok := p.RoleIn(project)
	return ok && r.Includes(need)
}

// SeesProject says whether project exists for this principal: objects of
// projects it cannot see are reported NotFound, never PermissionDenied.
func (p *Principal) SeesProject(project string) bool {
	_, ok := p.RoleIn(project)
	return ok
}

type principalKey struct{}

// NewContext returns ctx carrying p.
func NewContext(ctx context.Context, p *Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// FromContext returns the principal of the call ctx belongs to, or nil
// when there is none (a call the server did not authenticate: only the
// health service and JoinHost, which carries its own credential).
func FromContext(ctx context.Context) *Principal {
	p, _ := ctx.Value(principalKey{}).(*Principal)
	return p
}
