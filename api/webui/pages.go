package webui

import (
	"context"
	"net/http"
	"sort"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// maxListed bounds the items a page lists (a page of the console is for
// people; scripts use the API's pages).
const maxListed = 1000

// phaseCount is one line of the overview's VM counts.
type phaseCount struct {
	Phase minicloudv1.VMPhase
	Count int
}

type overviewView struct {
	Hosts []*minicloudv1.Host
	// HostsError says why hosts are not shown (listing them is an
	// admin's right).
	HostsError string
	Phases     []phaseCount
	VMs        int
}

func (h *Handler) overview(w http.ResponseWriter, r *http.Request, s *session) {
	var v overviewView
	hosts, err := h.listHosts(s)
	switch {
	case errdefs.KindOf(err) == errdefs.KindPermissionDenied:
		v.HostsError = "Hosts are shown to admins only."
	case err != nil:
		h.fail(w, r, err)
		return
	}
	v.Hosts = hosts
	vms, err := client.ListAll(s.ctx, &minicloudv1.ListVMsRequest{}, h.api.VMs.ListVMs, maxListed)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	counts := map[minicloudv1.VMPhase]int{}
	for _, vm := range vms.GetVms() {
		counts[vm.GetStatus().GetPhase()]++
	}
	for p, n := range counts {
		v.Phases = append(v.Phases, phaseCount{p, n})
	}
	sort.Slice(v.Phases, func(i, j int) bool { return v.Phases[i].Phase < v.Phases[j].Phase })
	v.VMs = len(vms.GetVms())
	h.render(w, r, http.StatusOK, "overview", s, v)
}

func (h *Handler) listHosts(s *session) ([]*minicloudv1.Host, error) {
	resp, err := client.ListAll(s.ctx, &minicloudv1.ListHostsRequest{}, h.api.Hosts.ListHosts, maxListed)
	return resp.GetHosts(), err
}

func (h *Handler) hostList(w http.ResponseWriter, r *http.Request, s *session) {
	hosts, err := h.listHosts(s)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, http.StatusOK, "hosts", s, hosts)
}

// listPage serves a page listing what one paginated List RPC returns.
func listPage[Req, Resp proto.Message, Item any](h *Handler, page string, newReq func() Req,
	call func(context.Context, Req, ...grpc.CallOption) (Resp, error), items func(Resp) []Item) func(http.ResponseWriter, *http.Request, *session) {
	return func(w http.ResponseWriter, r *http.Request, s *session) {
		resp, err := client.ListAll(s.ctx, newReq(), call, maxListed)
		if err != nil {
			h.fail(w, r, err)
			return
		}
		h.render(w, r, http.StatusOK, page, s, items(resp))
	}
}
