package server_test

import (
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/api/paging"
	"github.com/minicloud/minicloud/pkg/client"
)

// listVMs follows every page of req (page size size) and returns the VMs
// and how many pages it took; every page must read the same snapshot.
func (e *env) listVMs(t *testing.T, req *minicloudv1.ListVMsRequest, size int32, between func(page int)) ([]*minicloudv1.VM, int) {
	t.Helper()
	req.PageSize, req.PageToken = size, ""
	var all []*minicloudv1.VM
	var rev int64
	for pages := 1; ; pages++ {
		resp, err := e.vms.ListVMs(ctx(t), req)
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		if len(resp.Vms) > int(size) {
			t.Fatalf("page %d has %d VMs, more than %d", pages, len(resp.Vms), size)
		}
		if rev != 0 && resp.ResourceVersion != rev {
			t.Fatalf("page %d read revision %d, the first %d", pages, resp.ResourceVersion, rev)
		}
		rev = resp.ResourceVersion
		all = append(all, resp.Vms...)
		if resp.NextPageToken == "" {
			return all, pages
		}
		if between != nil {
			between(pages)
		}
		req.PageToken = resp.NextPageToken
	}
}

func names(vms []*minicloudv1.VM) string {
	var s []string
	for _, vm := range vms {
		s = append(s, vm.Meta.Name)
	}
	return fmt.Sprint(s)
}

func TestListVMsPagesAndFilters(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	var want []string
	for i := range 12 {
		name := fmt.Sprintf("web%02d", i)
		want = append(want, name)
		vm := e.createVM(name, func(r *minicloudv1.CreateVMRequest) {
			if i%2 == 0 {
				r.Labels = map[string]string{"tier": "web"}
			}
		})
		if i < 4 {
			e.place(vm.Meta.Id, "h1")
		}
	}

	// Pages of 5: 5, 5, 2, in name order, from one snapshot: a VM created
	// between pages is not in the later ones.
	vms, pages := e.listVMs(t, &minicloudv1.ListVMsRequest{}, 5, func(page int) {
		if page == 1 {
			e.createVM("web99")
		}
	})
	if pages != 3 || names(vms) != fmt.Sprint(want) {
		t.Fatalf("%d pages: %s, want 3 pages of %v", pages, names(vms), want)
	}
	if vms, _ := e.listVMs(t, &minicloudv1.ListVMsRequest{AllProjects: true}, 1000, nil); len(vms) != 13 {
		t.Fatalf("all projects: %s", names(vms))
	}
	// The client follows the pages (what the CLI does), up to a limit.
	all, err := client.ListAll(ctx(t), &minicloudv1.ListVMsRequest{PageSize: 4}, e.vms.ListVMs, 0)
	if err != nil || len(all.Vms) != 13 || all.NextPageToken != "" || all.Vms[12].Meta.Name != "web99" {
		t.Fatalf("ListAll: %s %v", names(all.GetVms()), err)
	}
	if some, err := client.ListAll(ctx(t), &minicloudv1.ListVMsRequest{PageSize: 4}, e.vms.ListVMs, 6); err != nil || names(some.Vms) != fmt.Sprint(want[:6]) {
		t.Fatalf("ListAll up to 6: %s %v", names(some.GetVms()), err)
	}

	for _, c := range []struct {
		req  *minicloudv1.ListVMsRequest
		want int
	}{
		{&minicloudv1.ListVMsRequest{Host: "h1"}, 4},
		{&minicloudv1.ListVMsRequest{Phase: minicloudv1.VMPhase_VM_PHASE_SCHEDULED}, 4},
		{&minicloudv1.ListVMsRequest{Phase: minicloudv1.VMPhase_VM_PHASE_PENDING}, 9},
		{&minicloudv1.ListVMsRequest{LabelSelector: "tier=web"}, 6},
		{&minicloudv1.ListVMsRequest{LabelSelector: "tier != web"}, 7},
		{&minicloudv1.ListVMsRequest{LabelSelector: "!tier"}, 7},
		{&minicloudv1.ListVMsRequest{LabelSelector: "tier,tier==web", Host: "h1"}, 2},
	} {
		vms, _ := e.listVMs(t, c.req, 2, nil)
		if len(vms) != c.want {
			t.Errorf("%v: %s, want %d VMs", c.req, names(vms), c.want)
		}
		for _, vm := range vms {
			if (c.req.Host != "" && vm.Status.Host != c.req.Host) || (c.req.Phase != 0 && vm.Status.Phase != c.req.Phase) {
				t.Errorf("%v listed %s on %q in %v", c.req, vm.Meta.Name, vm.Status.Host, vm.Status.Phase)
			}
		}
	}

	first, err := e.vms.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{PageSize: 2, Host: "h1"})
	if err != nil || first.NextPageToken == "" {
		t.Fatal(first, err)
	}
	flavors, err := e.flv.ListFlavors(ctx(t), &minicloudv1.ListFlavorsRequest{PageSize: 1})
	if err != nil || flavors.NextPageToken == "" {
		t.Fatal(flavors, err)
	}
	for name, c := range map[string]struct {
		req  *minicloudv1.ListVMsRequest
		want string
	}{
		"page_size -1":       {&minicloudv1.ListVMsRequest{PageSize: -1}, "page_size -1 is out of range"},
		"page_size over max": {&minicloudv1.ListVMsRequest{PageSize: paging.MaxSize + 1}, "give 1 to 1000"},
		"a token of flavors": {&minicloudv1.ListVMsRequest{PageToken: flavors.NextPageToken}, "not a token of this list"},
		"a forged token":     {&minicloudv1.ListVMsRequest{PageToken: "eyJsIjoidm1zIn0.AAAA"}, "not a token of this list"},
		"other filters":      {&minicloudv1.ListVMsRequest{PageToken: first.NextPageToken, Host: "h2"}, "other filters"},
		"another project":    {&minicloudv1.ListVMsRequest{PageToken: first.NextPageToken, Host: "h1", AllProjects: true}, "other filters"},
		"bad selector":       {&minicloudv1.ListVMsRequest{LabelSelector: "tier=web,,"}, "is not a label key"},
		"bad phase":          {&minicloudv1.ListVMsRequest{Phase: 99}, "phase 99 is not a VM phase"},
		"bad host":           {&minicloudv1.ListVMsRequest{Host: "Not_A_Host"}, "host"},
	} {
		_, err := e.vms.ListVMs(ctx(t), c.req)
		if statusCode(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
			continue
		}
		wantCode(t, err, codes.InvalidArgument, c.want)
	}
}

// Every other List RPC pages the same way.
func TestEveryListIsPaginated(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	authc := minicloudv1.NewAuthServiceClient(e.conn)
	for i := range 3 {
		name := fmt.Sprintf("p%d", i)
		e.createProjects(name)
		if _, err := e.flv.CreateFlavor(c, &minicloudv1.CreateFlavorRequest{Name: name, Vcpus: 1, MemoryMib: 128, DiskGib: 1}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: name, Cidr: fmt.Sprintf("10.%d.0.0/24", 50+i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.sgs.CreateServerGroup(c, &minicloudv1.CreateServerGroupRequest{Name: name, Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_ANTI_AFFINITY}); err != nil {
			t.Fatal(err)
		}
		e.registerHost("h"+name, "127.0.0.1:1")
		e.putImage("img"+name, 0)
		if _, err := authc.CreateUser(c, &minicloudv1.CreateUserRequest{Name: "u" + name, Project: name, Role: "member"}); err != nil {
			t.Fatal(err)
		}
		if _, err := authc.CreateToken(c, &minicloudv1.CreateTokenRequest{User: "u" + name}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.hosts.CreateJoinToken(c, &minicloudv1.CreateJoinTokenRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	type page struct {
		n    int
		next string
	}
	lists := map[string]struct {
		call func(size int32, token string) (page, error)
		want int
	}{
		"flavors": {func(s int32, tok string) (page, error) {
			r, err := e.flv.ListFlavors(c, &minicloudv1.ListFlavorsRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetFlavors()), r.GetNextPageToken()}, err
		}, 5},
		"networks": {func(s int32, tok string) (page, error) {
			r, err := e.nets.ListNetworks(c, &minicloudv1.ListNetworksRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetNetworks()), r.GetNextPageToken()}, err
		}, 4},
		"server groups": {func(s int32, tok string) (page, error) {
			r, err := e.sgs.ListServerGroups(c, &minicloudv1.ListServerGroupsRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetServerGroups()), r.GetNextPageToken()}, err
		}, 3},
		"hosts": {func(s int32, tok string) (page, error) {
			r, err := e.hosts.ListHosts(c, &minicloudv1.ListHostsRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetHosts()), r.GetNextPageToken()}, err
		}, 3},
		"join tokens": {func(s int32, tok string) (page, error) {
			r, err := e.hosts.ListJoinTokens(c, &minicloudv1.ListJoinTokensRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetTokens()), r.GetNextPageToken()}, err
		}, 3},
		"images": {func(s int32, tok string) (page, error) {
			r, err := e.images.ListImages(c, &minicloudv1.ListImagesRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetImages()), r.GetNextPageToken()}, err
		}, 4},
		"projects": {func(s int32, tok string) (page, error) {
			r, err := authc.ListProjects(c, &minicloudv1.ListProjectsRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetProjects()), r.GetNextPageToken()}, err
		}, 4},
		"users": {func(s int32, tok string) (page, error) {
			r, err := authc.ListUsers(c, &minicloudv1.ListUsersRequest{PageSize: s, PageToken: tok})
			return page{len(r.GetUsers()), r.GetNextPageToken()}, err
		}, 4},
		"tokens": {func(s int32, tok string) (page, error) {
			r, err := authc.ListTokens(c, &minicloudv1.ListTokensRequest{AllUsers: true, PageSize: s, PageToken: tok})
			return page{len(r.GetTokens()), r.GetNextPageToken()}, err
		}, 7},
	}
	for name, l := range lists {
		total, pages, token := 0, 0, ""
		for {
			p, err := l.call(2, token)
			if err != nil {
				t.Fatalf("%s, page %d: %v", name, pages+1, err)
			}
			if p.n > 2 {
				t.Fatalf("%s: a page of %d, asked for 2", name, p.n)
			}
			total, pages, token = total+p.n, pages+1, p.next
			if token == "" {
				break
			}
		}
		if total != l.want || pages != (l.want+1)/2 {
			t.Errorf("%s: %d items in %d pages, want %d in %d", name, total, pages, l.want, (l.want+1)/2)
		}
		_, err := l.call(paging.MaxSize+1, "")
		wantCode(t, err, codes.InvalidArgument, "page_size 1001 is out of range")
		_, err = l.call(0, "bogus")
		wantCode(t, err, codes.InvalidArgument, "not a token of this list")
	}
}
