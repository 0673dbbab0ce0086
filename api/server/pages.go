package server

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/api/paging"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// Every List RPC is paginated (package paging has the contract). The lists
// of single-key objects go through listPage; ListVMs pages its name index
// (so VMs come by project and name, and a project's list reads only its
// own keys) and reads each page's VMs at the list's snapshot.

// listPage returns one page of the objects under prefix that keep accepts
// (nil: all), with resource versions set, and the next page's token.
// filters is the request's filters in canonical form (see paging.Open).
func listPage[T proto.Message](ctx context.Context, s *Server, list, prefix, filters string, req paging.Request,
	newT func() T, keep func(key string, v T) bool,
) ([]T, string, error) {
	p, err := s.pages.Open(list, prefix, filters, req)
	if err != nil {
		return nil, "", err
	}
	var out []T
	next, err := p.Scan(ctx, s.etcd, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) {
		n := 0
		for _, kv := range kvs {
			v := newT()
			if err := store.Decode(kv, v); err != nil {
				return 0, err
			}
			if m, ok := any(v).(interface {
				GetMeta() *minicloudv1.ObjectMeta
			}); ok && m.GetMeta() != nil {
				m.GetMeta().ResourceVersion = kv.ModRevision
			}
			if keep == nil || keep(string(kv.Key), v) {
				out = append(out, v)
				n++
			}
		}
		return n, nil
	})
	return out, next, err
}

// MaxPageBytes is the size after which a ListVMs page ends early (the
// next chunk of vmChunk VMs is not read).
const MaxPageBytes = 64 << 20

// vmChunk is how many VMs a ListVMs page reads at a time: one read
// transaction of their specs and statuses (etcd's --max-txn-ops is 128).
const vmChunk = 64

// listVMsPage returns one page of the VMs that match.
func (s *Server) listVMsPage(ctx context.Context, req *minicloudv1.ListVMsRequest, project string) (*minicloudv1.ListVMsResponse, error) {
	if ph := req.GetPhase(); ph != 0 {
		if _, ok := minicloudv1.VMPhase_name[int32(ph)]; !ok {
			return nil, errdefs.Invalid("phase %d is not a VM phase", ph)
		}
	}
	if h := req.GetHost(); h != "" {
		if err := validateHostname("host", h); err != nil {
			return nil, err
		}
	}
	sel, err := parseLabelSelector(req.GetLabelSelector())
	if err != nil {
		return nil, err
	}
	prefix := store.VMNamePrefix
	if !req.GetAllProjects() {
		prefix = store.VMNameKey(project, "")
	}
	filters := fmt.Sprintf("%q %q %d %q", prefix, req.GetHost(), req.GetPhase(), req.GetLabelSelector())
	p, err := s.pages.Open("vms", prefix, filters, req)
	if err != nil {
		return nil, err
	}
	// A VM may be up to MaxVMSpecBytes: a page ends early, between chunks,
	// once it holds MaxPageBytes, so it stays far below what a client
	// accepts (pkg/client.MaxResponseBytes).
	bytes := 0
	p.Chunked(vmChunk, func() bool { return bytes >= MaxPageBytes })
	resp := &minicloudv1.ListVMsResponse{}
	resp.NextPageToken, err = p.Scan(ctx, s.etcd, func(kvs []*mvccpb.KeyValue, rev int64) (int, error) {
		ids := make([]string, len(kvs))
		for i, kv := range kvs {
			ids[i] = string(kv.Value)
		}
		vms, err := store.GetVMs(ctx, s.etcd, ids, rev)
		if err != nil {
			return 0, err
		}
		n := 0
		for _, vm := range vms {
			if vm == nil { // a name index without its VM: skip it
				continue
			}
			if (req.GetHost() == "" || vm.GetStatus().GetHost() == req.GetHost()) &&
				(req.GetPhase() == 0 || vm.GetStatus().GetPhase() == req.GetPhase()) &&
				sel.matches(vm.GetMeta().GetLabels()) {
				resp.Vms = append(resp.Vms, vm)
				bytes += proto.Size(vm)
				n++
			}
		}
		return n, nil
	})
	if err != nil {
		return nil, err
	}
	resp.ResourceVersion = p.Rev()
	return resp, nil
}

// labelSelector is a parsed label_selector: every requirement must hold.
type labelSelector []labelRequirement

type labelRequirement struct {
	key, value string
	op         string // "=", "!=", "exists", "!exists"
}

var selectorKey = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9._-]{0,62}$`)

// parseLabelSelector parses "k=v,k2!=v2,k3,!k4" (spaces around parts are
// ignored).
func parseLabelSelector(s string) (labelSelector, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	if len(s) > 4096 {
		return nil, errdefs.Invalid("label_selector is %d bytes; keep it under 4 KiB", len(s))
	}
	var sel labelSelector
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		var r labelRequirement
		switch {
		case strings.Contains(part, "!="):
			k, v, _ := strings.Cut(part, "!=")
			r = labelRequirement{key: strings.TrimSpace(k), value: strings.TrimSpace(v), op: "!="}
		case strings.Contains(part, "="):
			k, v, _ := strings.Cut(strings.Replace(part, "==", "=", 1), "=")
			r = labelRequirement{key: strings.TrimSpace(k), value: strings.TrimSpace(v), op: "="}
		case strings.HasPrefix(part, "!"):
			r = labelRequirement{key: strings.TrimSpace(part[1:]), op: "!exists"}
		default:
			r = labelRequirement{key: part, op: "exists"}
		}
		if !selectorKey.MatchString(r.key) {
			return nil, errdefs.Invalid("label_selector %q: %q is not a label key: write key=value, key!=value, key or !key, separated by commas", s, r.key)
		}
		sel = append(sel, r)
	}
	return sel, nil
}

func (sel labelSelector) matches(labels map[string]string) bool {
	for _, r := range sel {
		v, has := labels[r.key]
		ok := false
		switch r.op {
		case "=":
			ok = has && v == r.value
		case "!=":
			ok = !has || v != r.value
		case "exists":
			ok = has
		case "!exists":
			ok = !has
		}
		if !ok {
			return false
		}
	}
	return true
}
