package server_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/encoding/protowire"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

func TestFlavors(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	for _, bad := range []struct {
		req      *minicloudv1.CreateFlavorRequest
		fragment string
	}{
		{&minicloudv1.CreateFlavorRequest{Name: "x", Vcpus: 0, MemoryMib: 512, DiskGib: 1}, "vcpus 0 is out of range"},
		{&minicloudv1.CreateFlavorRequest{Name: "x", Vcpus: 1, MemoryMib: 1, DiskGib: 1}, "memory_mib 1"},
		{&minicloudv1.CreateFlavorRequest{Name: "x", Vcpus: 1, MemoryMib: 512}, "disk_gib 0"},
		{&minicloudv1.CreateFlavorRequest{Name: "X", Vcpus: 1, MemoryMib: 512, DiskGib: 1}, "not a DNS label"},
	} {
		before := e.dump(t)
		_, err := e.flv.CreateFlavor(c, bad.req)
		wantCode(t, err, codes.InvalidArgument, bad.fragment)
		e.wantUnchanged(t, before)
	}
	_, err := e.flv.CreateFlavor(c, &minicloudv1.CreateFlavorRequest{Name: "small", Vcpus: 2, MemoryMib: 512, DiskGib: 1})
	wantCode(t, err, codes.AlreadyExists, "flavor small already exists")
	f, err := e.flv.GetFlavor(c, &minicloudv1.GetFlavorRequest{Name: "small"})
	if err != nil || f.Vcpus != 1 || f.Meta.ResourceVersion == 0 {
		t.Fatalf("get: %v %v", f, err)
	}
	list, err := e.flv.ListFlavors(c, &minicloudv1.ListFlavorsRequest{})
	if err != nil || len(list.Flavors) != 2 || list.Flavors[0].Meta.Name != "small" {
		t.Fatalf("list: %v %v", list, err)
	}
	e.createVM("web1")
	_, err = e.flv.DeleteFlavor(c, &minicloudv1.DeleteFlavorRequest{Name: "small"})
	wantCode(t, err, codes.FailedPrecondition, "flavor small is used by vm web1")
	if _, err := e.flv.DeleteFlavor(c, &minicloudv1.DeleteFlavorRequest{Name: "tiny"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.flv.GetFlavor(c, &minicloudv1.GetFlavorRequest{Name: "tiny"})
	wantCode(t, err, codes.NotFound, "flavor tiny not found")
	_, err = e.flv.DeleteFlavor(c, &minicloudv1.DeleteFlavorRequest{Name: "tiny"})
	wantCode(t, err, codes.NotFound, "flavor tiny not found")
}

func TestNetworks(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	for _, bad := range []struct {
		req      *minicloudv1.CreateNetworkRequest
		code     codes.Code
		fragment string
	}{
		{&minicloudv1.CreateNetworkRequest{Name: "n"}, codes.InvalidArgument, "cidr is required"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "fd00::/64"}, codes.InvalidArgument, "not an IPv4 prefix"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "10.1.0.5/24"}, codes.InvalidArgument, "did you mean 10.1.0.0/24"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "10.1.0.0/30"}, codes.InvalidArgument, "between /8 and /29"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "10.1.0.0/24", Gateway: "10.2.0.1"}, codes.InvalidArgument, "must be a host address inside"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "10.1.0.0/24", Mtu: 100}, codes.InvalidArgument, "mtu 100"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "127.0.0.0/24"}, codes.InvalidArgument, "overlaps 127.0.0.0/8 (loopback)"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "169.254.169.0/24"}, codes.InvalidArgument, "link-local"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "160.0.0.0/4"}, codes.InvalidArgument, "between /8 and /29"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "169.0.0.0/8"}, codes.InvalidArgument, "link-local"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "224.0.0.0/8"}, codes.InvalidArgument, "multicast"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "0.0.0.0/8"}, codes.InvalidArgument, "this network"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "255.255.255.0/24"}, codes.InvalidArgument, "broadcast"},
		{&minicloudv1.CreateNetworkRequest{Name: "n", Cidr: "10.99.0.128/25"}, codes.FailedPrecondition, "overlaps network default (project default, 10.99.0.0/24)"},
		{&minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.5.0.0/24"}, codes.AlreadyExists, "network default already exists"},
	} {
		before := e.dump(t)
		_, err := e.nets.CreateNetwork(c, bad.req)
		wantCode(t, err, bad.code, bad.fragment)
		e.wantUnchanged(t, before)
	}
	e.createProjects("p2")
	n, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "dmz", Project: "p2", Cidr: "10.5.0.0/24", Gateway: "10.5.0.254", DisableNat: true})
	if err != nil || n.Gateway != "10.5.0.254" || n.Mtu != 1450 || n.Nat || len(n.Bridge) != 11 || n.Meta.Project != "p2" {
		t.Fatalf("create: %v %v", n, err)
	}
	if list, _ := e.nets.ListNetworks(c, &minicloudv1.ListNetworksRequest{Project: "p2"}); len(list.Networks) != 1 {
		t.Fatalf("list p2: %v", list)
	}
	e.createVM("web1")
	_, err = e.nets.DeleteNetwork(c, &minicloudv1.DeleteNetworkRequest{Name: "default"})
	wantCode(t, err, codes.FailedPrecondition, "network default is used by vm web1 (project default)")
	if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.nets.DeleteNetwork(c, &minicloudv1.DeleteNetworkRequest{Name: "default"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.nets.GetNetwork(c, &minicloudv1.GetNetworkRequest{Name: "default"})
	wantCode(t, err, codes.NotFound, "network default not found in project default")
}

// TestNetworkVNIs: each network gets its own VNI, recorded under vnis/ in
// the create's transaction and released by the delete's.
func TestNetworkVNIs(t *testing.T) {
	e := newEnv(t)
	c := ctx(t)
	owner := func(vni uint32) string {
		t.Helper()
		resp, err := e.etcd.Get(c, store.VNIKey(vni))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			return ""
		}
		return string(resp.Kvs[0].Value)
	}
	vnis := map[uint32]bool{}
	var nets []*minicloudv1.Network
	for i, cidr := range []string{"10.10.0.0/24", "10.11.0.0/24", "10.12.0.0/24"} {
		n, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: fmt.Sprintf("n%d", i), Cidr: cidr, DnsServers: []string{"192.0.2.53"}})
		if err != nil {
			t.Fatal(err)
		}
		if n.Vni < store.DefaultVNIRange.First || n.Vni > store.DefaultVNIRange.Last || vnis[n.Vni] {
			t.Fatalf("network %s: VNI %d (taken: %v)", n.Meta.Name, n.Vni, vnis)
		}
		if owner(n.Vni) != n.Meta.Id {
			t.Fatalf("vnis/%d is not owned by %s", n.Vni, n.Meta.Id)
		}
		if len(n.DnsServers) != 1 || n.DnsServers[0] != "192.0.2.53" {
			t.Fatalf("dns_servers %v", n.DnsServers)
		}
		vnis[n.Vni] = true
		nets = append(nets, n)
	}
	before := e.dump(t)
	_, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "bad", Cidr: "10.13.0.0/24", DnsServers: []string{"::1"}})
	wantCode(t, err, codes.InvalidArgument, `dns server "::1"`)
	_, err = e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "n0", Cidr: "10.14.0.0/24"})
	wantCode(t, err, codes.AlreadyExists, "already exists")
	e.wantUnchanged(t, before)
	if _, err := e.nets.DeleteNetwork(c, &minicloudv1.DeleteNetworkRequest{Name: "n1"}); err != nil {
		t.Fatal(err)
	}
	if o := owner(nets[1].Vni); o != "" {
		t.Fatalf("VNI %d still owned by %q after its network was deleted", nets[1].Vni, o)
	}
	if owner(nets[0].Vni) != nets[0].Meta.Id || owner(nets[2].Vni) != nets[2].Meta.Id {
		t.Fatal("deleting n1 released another network's VNI")
	}
}

func TestServerGroups(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	_, err := e.sgs.CreateServerGroup(c, &minicloudv1.CreateServerGroupRequest{Name: "ha"})
	wantCode(t, err, codes.InvalidArgument, "policy is required")
	sg, err := e.sgs.CreateServerGroup(c, &minicloudv1.CreateServerGroupRequest{Name: "ha", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_ANTI_AFFINITY})
	if err != nil || sg.Meta.Project != "default" {
		t.Fatalf("create: %v %v", sg, err)
	}
	_, err = e.sgs.CreateServerGroup(c, &minicloudv1.CreateServerGroupRequest{Name: "ha", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY})
	wantCode(t, err, codes.AlreadyExists, "already exists")
	if got, err := e.sgs.GetServerGroup(c, &minicloudv1.GetServerGroupRequest{Name: "ha"}); err != nil || got.Policy != sg.Policy {
		t.Fatalf("get: %v %v", got, err)
	}
	e.createVM("web1", func(r *minicloudv1.CreateVMRequest) { r.Spec.ServerGroup = "ha" })
	_, err = e.sgs.DeleteServerGroup(c, &minicloudv1.DeleteServerGroupRequest{Name: "ha"})
	wantCode(t, err, codes.FailedPrecondition, "server group ha is used by vm web1")
	if list, _ := e.sgs.ListServerGroups(c, &minicloudv1.ListServerGroupsRequest{}); len(list.ServerGroups) != 1 {
		t.Fatalf("list: %v", list)
	}
}

func TestImagesAreServedAndGuardedByVMs(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createVM("web1")
	img, err := e.images.GetImage(ctx(t), &minicloudv1.GetImageRequest{Name: "debian"})
	if err != nil || img.Meta.Name != "debian" {
		t.Fatalf("get image through the API: %v %v", img, err)
	}
	_, err = e.images.DeleteImage(ctx(t), &minicloudv1.DeleteImageRequest{Name: "debian"})
	wantCode(t, err, codes.FailedPrecondition, "web1")
}

func TestHealthReflectionAndMetrics(t *testing.T) {
	e := newEnv(t)
	e.seed()
	c := ctx(t)
	for _, svc := range []string{"", "minicloud.v1.VMService", "minicloud.v1.HostService"} {
		resp, err := healthpb.NewHealthClient(e.conn).Check(c, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health %q: %v %v", svc, resp, err)
		}
	}
	rs, err := reflectionpb.NewServerReflectionClient(e.conn).ServerReflectionInfo(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := rs.Recv()
	if err != nil || !strings.Contains(fmt.Sprint(resp.GetListServicesResponse()), "minicloud.v1.VMService") {
		t.Fatalf("reflection: %v %v", resp, err)
	}
	_, _ = e.vms.GetVM(c, &minicloudv1.GetVMRequest{Name: "nope"})
	hs := httptest.NewServer(e.srv.MetricsHandler())
	defer hs.Close()
	for path, want := range map[string]string{
		"/metrics": `minicloud_api_requests_total{code="NotFound",method="/minicloud.v1.VMService/GetVM"} 1`,
		"/healthz": "ok",
	} {
		r, err := http.Get(hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(r.Body)
		r.Body.Close()
		if r.StatusCode != 200 || !strings.Contains(string(body), want) {
			t.Fatalf("%s: %d, body lacks %q", path, r.StatusCode, want)
		}
	}
}

// TestUnknownFieldsAtAnyDepth: fields this server does not know are refused
// wherever they hide (here inside a repeated message of a host report).
func TestUnknownFieldsAtAnyDepth(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")
	ev := &minicloudv1.Event{Reason: "Started"}
	ev.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 77, protowire.VarintType), 1))
	before := e.dump(t)
	_, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id,
		Events: []*minicloudv1.Event{{Reason: "Fine"}, ev}})
	wantCode(t, err, codes.InvalidArgument, "(in minicloud.v1.Event)")
	e.wantUnchanged(t, before)
}
