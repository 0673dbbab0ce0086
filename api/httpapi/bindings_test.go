package httpapi_test

import (
	"regexp"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/api/annotations"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/minicloud/minicloud/api/auth"
	_ "github.com/minicloud/minicloud/api/minicloud/v1"
)

// agentsOnly tells whether only host agents call method: the policy table
// (api/auth) gives it to host certificates (ScopeHost) or to a join token
// (ScopePublic: JoinHost), or the API does not serve it at all
// (AgentService, served by agents). Those have no HTTP binding, since the
// HTTP listener carries users' tokens only (docs/api.md, "HTTP/JSON").
func agentsOnly(t *testing.T, sd protoreflect.ServiceDescriptor, method string) bool {
	rule, ok := auth.RuleFor(method)
	if !ok {
		if sd.FullName() != "minicloud.v1.AgentService" {
			t.Errorf("%s is in no policy rule", method)
		}
		return true
	}
	return rule.Scope == auth.ScopeHost || rule.Scope == auth.ScopePublic
}

// rpc is one method of minicloud.v1 as the proto registry has it.
type rpc struct {
	service, method string // "VMService", "CreateVM"
	agent           bool   // agentsOnly
	verb, path      string // its google.api.http binding ("" if none)
}

// rpcs walks every service of minicloud.v1 in the proto registry.
func rpcs(t *testing.T) []rpc {
	t.Helper()
	var out []rpc
	protoregistry.GlobalFiles.RangeFilesByPackage("minicloud.v1", func(fd protoreflect.FileDescriptor) bool {
		for i := range fd.Services().Len() {
			sd := fd.Services().Get(i)
			for j := range sd.Methods().Len() {
				md := sd.Methods().Get(j)
				r := rpc{service: string(sd.Name()), method: string(md.Name())}
				r.agent = agentsOnly(t, sd, "/"+string(sd.FullName())+"/"+r.method)
				rule, _ := proto.GetExtension(md.Options(), annotations.E_Http).(*annotations.HttpRule)
				switch p := rule.GetPattern().(type) {
				case *annotations.HttpRule_Get:
					r.verb, r.path = "get", p.Get
				case *annotations.HttpRule_Post:
					r.verb, r.path = "post", p.Post
				case *annotations.HttpRule_Put:
					r.verb, r.path = "put", p.Put
				case *annotations.HttpRule_Patch:
					r.verb, r.path = "patch", p.Patch
				case *annotations.HttpRule_Delete:
					r.verb, r.path = "delete", p.Delete
				case nil:
				default:
					t.Errorf("%s.%s: binding %T: use GET, POST, PUT, PATCH or DELETE", r.service, r.method, p)
				}
				out = append(out, r)
			}
		}
		return true
	})
	if len(out) < 50 {
		t.Fatalf("walked %d RPCs: the registry is missing minicloud.v1's services", len(out))
	}
	return out
}

// TestEveryUserRPCHasAnHTTPBinding: a user or operator RPC added without a
// google.api.http option fails here, and so does an agent's RPC given one.
func TestEveryUserRPCHasAnHTTPBinding(t *testing.T) {
	for _, r := range rpcs(t) {
		switch {
		case r.agent && r.path != "":
			t.Errorf("%s.%s is an agent's RPC but has an HTTP binding", r.service, r.method)
		case !r.agent && r.path == "":
			t.Errorf("%s.%s has no google.api.http option: every user and operator RPC is reachable as HTTP/JSON (proto/, then make generate)", r.service, r.method)
		case r.path != "" && !strings.HasPrefix(r.path, "/v1/"):
			t.Errorf("%s.%s: %s is not under /v1/", r.service, r.method, r.path)
		}
	}
}

var pathParam = regexp.MustCompile(`\{([a-z_]+)\}`)

// openAPIPath is path as the OpenAPI document spells it: parameters by
// their JSON names ({host_port} → {hostPort}).
func openAPIPath(path string) string {
	return pathParam.ReplaceAllStringFunc(path, func(p string) string {
		parts := strings.Split(strings.Trim(p, "{}"), "_")
		for i := 1; i < len(parts); i++ {
			parts[i] = strings.ToUpper(parts[i][:1]) + parts[i][1:]
		}
		return "{" + strings.Join(parts, "") + "}"
	})
}
