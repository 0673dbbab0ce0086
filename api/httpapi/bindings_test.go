package httpapi_test

import (
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

// TestEveryUserRPCHasAnHTTPBinding walks every service of minicloud.v1 in
// the proto registry: a user or operator RPC added without a
// google.api.http option fails here, and so does an agent's RPC given one.
func TestEveryUserRPCHasAnHTTPBinding(t *testing.T) {
	seen := 0
	protoregistry.GlobalFiles.RangeFilesByPackage("minicloud.v1", func(fd protoreflect.FileDescriptor) bool {
		for i := range fd.Services().Len() {
			sd := fd.Services().Get(i)
			for j := range sd.Methods().Len() {
				md := sd.Methods().Get(j)
				name := "/" + string(sd.FullName()) + "/" + string(md.Name())
				agent := agentsOnly(t, sd, name)
				seen++
				rule, _ := proto.GetExtension(md.Options(), annotations.E_Http).(*annotations.HttpRule)
				bound := rule != nil && rule.GetPattern() != nil
				switch {
				case agent && bound:
					t.Errorf("%s is an agent's RPC but has an HTTP binding", name)
				case !agent && !bound:
					t.Errorf("%s has no google.api.http option: every user and operator RPC is reachable as HTTP/JSON (proto/, then make generate)", name)
				}
			}
		}
		return true
	})
	if seen < 50 {
		t.Fatalf("walked %d RPCs: the registry is missing minicloud.v1's services", seen)
	}
}
