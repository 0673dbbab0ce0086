package server_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

func i64(v int64) *int64 { return &v }

// replica starts a second API server on the same etcd (as another
// replica of the cluster would be) and returns its clients.
func (e *env) replica() (minicloudv1.VMServiceClient, minicloudv1.QuotaServiceClient) {
	e.t.Helper()
	_, addr := e.replicaServer()
	conn := e.userConnTo(addr, e.admin)
	return minicloudv1.NewVMServiceClient(conn), minicloudv1.NewQuotaServiceClient(conn)
}

func (e *env) quotas() minicloudv1.QuotaServiceClient {
	return minicloudv1.NewQuotaServiceClient(e.conn)
}

func (e *env) getQuota(project string) *minicloudv1.Quota {
	e.t.Helper()
	q, err := e.quotas().GetQuota(ctx(e.t), &minicloudv1.GetQuotaRequest{Project: project})
	if err != nil {
		e.t.Fatal(err)
	}
	return q
}

func (e *env) setQuota(project string, l *minicloudv1.QuotaLimits) {
	e.t.Helper()
	if _, err := e.quotas().SetQuota(ctx(e.t), &minicloudv1.SetQuotaRequest{Project: project, Limits: l}); err != nil {
		e.t.Fatal(err)
	}
}

// wantUsageCounted checks the usage record against a count of what the
// project holds: the record is exact, never drifting.
func (e *env) wantUsageCounted(project string) *minicloudv1.QuotaUsage {
	e.t.Helper()
	s, err := store.ReadUsage(ctx(e.t), e.etcd, project)
	if err != nil {
		e.t.Fatal(err)
	}
	recorded := s.Usage
	if err := store.CountUsage(ctx(e.t), e.etcd, &s); err != nil {
		e.t.Fatal(err)
	}
	if !proto.Equal(recorded, s.Usage) {
		e.t.Fatalf("usage of %s recorded %v, counted %v", project, recorded, s.Usage)
	}
	return recorded
}

// TestQuotaRaceExactlyOneOf64: with room for exactly one more VM, 64
// creates sent at once, half to each of two API replicas, make exactly
// one VM, round after round; every refusal says what was asked, used and
// allowed.
func TestQuotaRaceExactlyOneOf64(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vms2, _ := e.replica()
	clients := []minicloudv1.VMServiceClient{e.vms, vms2}
	// Each replica's VMs on a network of their own: the replicas' address
	// picks never collide, so only the quota's compare can stop a second
	// create.
	if _, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "other", Cidr: "10.97.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	networks := []string{"default", "other"}
	const rounds, racers = 5, 64
	for round := range rounds {
		e.setQuota("default", &minicloudv1.QuotaLimits{Instances: i64(int64(round + 1))})
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex
			won     []string
			refused int
		)
		for i := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("r%d-%d", round, i)
				_, err := clients[i%2].CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: name, RequestId: name,
					Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny", Networks: []string{networks[i%2]}}})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					won = append(won, name)
				case statusCode(err) == codes.ResourceExhausted:
					refused++
					want := fmt.Sprintf("instances: asked 1, used %d, allowed %d", round+1, round+1)
					if !strings.Contains(err.Error(), want) {
						t.Errorf("refusal %q does not say %q", err, want)
					}
				default:
					t.Errorf("create %s: %v", name, err)
				}
			}()
		}
		wg.Wait()
		if len(won) != 1 || refused != racers-1 {
			t.Fatalf("round %d: %d creates succeeded (%v), %d refused; want exactly 1 and %d", round, len(won), won, refused, racers-1)
		}
		if got := e.wantUsageCounted("default").GetInstances(); got != int64(round+1) {
			t.Fatalf("round %d: usage %d instances, want %d", round, got, round+1)
		}
	}
	if n := len(e.checkConsistent()); n != rounds {
		t.Fatalf("%d VMs exist after %d rounds", n, rounds)
	}
}

// TestQuotaDeleteGivesRoomBackOnce: a removal gives its VM's share back
// exactly once, whether the VM goes at once (no host) or when its host
// confirms, with an API server restart between DeleteVM and the host's
// confirmation, and however often the delete and the confirmation are
// repeated.
func TestQuotaDeleteGivesRoomBackOnce(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	e.setQuota("default", &minicloudv1.QuotaLimits{Instances: i64(2), Vcpus: i64(2), MemoryMib: i64(2048)})
	e.createVM("a")                                                                       // small: 1 vCPU, 1024 MiB, 4 GiB
	b := e.createVM("b", func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "tiny" }) // 1 vCPU, 256 MiB, 1 GiB
	_, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "c", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}})
	wantCode(t, err, codes.ResourceExhausted, "instances: asked 1, used 2, allowed 2; vcpus: asked 1, used 2, allowed 2")
	e.place(b.Meta.Id, "h1")
	want := func(instances, vcpus, mem, disk int64) {
		t.Helper()
		u := e.wantUsageCounted("default")
		if u.Instances != instances || u.Vcpus != vcpus || u.MemoryMib != mem || u.DiskGib != disk {
			t.Fatalf("usage %v, want %d instances, %d vCPUs, %d MiB, %d GiB", u, instances, vcpus, mem, disk)
		}
		if q := e.getQuota("default"); !proto.Equal(q.Usage, u) {
			t.Fatalf("GetQuota says %v, the store %v", q.Usage, u)
		}
	}
	want(2, 2, 1280, 5)

	// No host: removed at once; a second delete finds nothing.
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "a"}); err != nil {
		t.Fatal(err)
	}
	want(1, 1, 256, 1)
	_, err = e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "a"})
	wantCode(t, err, codes.NotFound, "vm a not found")
	want(1, 1, 256, 1)

	// On a host: still counted while DELETING, across a restart.
	for range 2 {
		if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "b"}); err != nil {
			t.Fatal(err)
		}
	}
	want(1, 1, 256, 1)
	e.stop()
	e.start()
	want(1, 1, 256, 1)
	if _, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: b.Meta.Id, Deleted: true}); err != nil {
		t.Fatal(err)
	}
	want(0, 0, 0, 0)
	// The host repeats its confirmation (it did not see the answer): nothing
	// is given back twice.
	_, err = e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: b.Meta.Id, Deleted: true})
	if err != nil && statusCode(err) != codes.NotFound {
		t.Fatalf("repeated confirmation: %v", err)
	}
	want(0, 0, 0, 0)

	// The room is there, exactly: two more fit, the third does not.
	e.createVM("d", func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "tiny" })
	e.createVM("f", func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "tiny" })
	_, err = e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "g", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}})
	wantCode(t, err, codes.ResourceExhausted, "instances: asked 1, used 2, allowed 2")
	want(2, 2, 512, 2)
}

// TestQuotaRestartBetweenCreatesAndDeletes: creates and deletes keep going
// while the API server is killed and restarted; afterwards the recorded
// usage equals a count of what the project holds.
func TestQuotaRestartBetweenCreatesAndDeletes(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.setQuota("default", &minicloudv1.QuotaLimits{Instances: i64(6)})
	for i := range 6 {
		e.createVM(fmt.Sprintf("v%d", i), func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "tiny" })
	}
	var wg sync.WaitGroup
	vms := e.vms
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Some of these are cut by the kill; what committed counts.
			vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: fmt.Sprintf("v%d", i)})
		}()
	}
	e.stop()
	wg.Wait()
	e.start()
	e.wantUsageCounted("default")
	for i := range 6 {
		e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: fmt.Sprintf("v%d", i)})
	}
	if u := e.wantUsageCounted("default"); u.Instances != 0 {
		t.Fatalf("usage %v after every VM went", u)
	}
	for i := range 6 {
		e.createVM(fmt.Sprintf("w%d", i), func(r *minicloudv1.CreateVMRequest) { r.Spec.Flavor = "tiny" })
	}
	_, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "x", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}})
	wantCode(t, err, codes.ResourceExhausted, "allowed 6")
}

// TestQuotaCountsExistingObjects: a project with VMs, a network and a
// server group from before quotas (no usage record) has them counted by
// its first charge, and is refused on that count.
func TestQuotaCountsExistingObjects(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createVM("old1")
	e.createVM("old2")
	if _, err := e.sgs.CreateServerGroup(ctx(t), &minicloudv1.CreateServerGroupRequest{Name: "g", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY}); err != nil {
		t.Fatal(err)
	}
	// Forget the record, as a store from before quotas would have none.
	if _, err := e.etcd.Delete(ctx(t), store.QuotaUsageKey("default")); err != nil {
		t.Fatal(err)
	}
	e.setQuota("default", &minicloudv1.QuotaLimits{Instances: i64(2), Networks: i64(1), ServerGroups: i64(1)})
	q := e.getQuota("default")
	if u := q.Usage; u.Instances != 2 || u.Vcpus != 2 || u.Networks != 1 || u.ServerGroups != 1 {
		t.Fatalf("counted usage %v", u)
	}
	_, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "new", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}})
	wantCode(t, err, codes.ResourceExhausted, "instances: asked 1, used 2, allowed 2")
	_, err = e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "n2", Cidr: "10.98.0.0/24"})
	wantCode(t, err, codes.ResourceExhausted, "networks: asked 1, used 1, allowed 1")
	_, err = e.sgs.CreateServerGroup(ctx(t), &minicloudv1.CreateServerGroupRequest{Name: "g2", Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY})
	wantCode(t, err, codes.ResourceExhausted, "server_groups: asked 1, used 1, allowed 1")

	// A removal while uncounted leaves a marker, and the next count is
	// exact.
	if _, err := e.etcd.Delete(ctx(t), store.QuotaUsageKey("default")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "old1"}); err != nil {
		t.Fatal(err)
	}
	if u := e.getQuota("default").Usage; u.Instances != 1 {
		t.Fatalf("usage %v after a delete while uncounted", u)
	}
	e.createVM("new")
	if u := e.wantUsageCounted("default"); u.Instances != 2 {
		t.Fatalf("usage %v", u)
	}
}

// TestQuotaNetworksAndServerGroups: networks and server groups count like
// VMs: refused when full, room given back once by their delete, and
// concurrent creates with room for one make one.
func TestQuotaNetworksAndServerGroups(t *testing.T) {
	e := newEnv(t)
	e.createProjects("p")
	e.seed() // network "default"
	e.setQuota("p", &minicloudv1.QuotaLimits{Networks: i64(1), ServerGroups: i64(1)})
	var wg sync.WaitGroup
	var mu sync.Mutex
	made := map[string]int{}
	for i := range 16 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, err := e.nets.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Project: "p", Name: fmt.Sprintf("n%d", i), Cidr: fmt.Sprintf("10.50.%d.0/24", i)})
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				made["network"]++
			} else if statusCode(err) != codes.ResourceExhausted {
				t.Errorf("network: %v", err)
			}
		}()
		go func() {
			defer wg.Done()
			_, err := e.sgs.CreateServerGroup(ctx(t), &minicloudv1.CreateServerGroupRequest{Project: "p", Name: fmt.Sprintf("g%d", i), Policy: minicloudv1.ServerGroupPolicy_SERVER_GROUP_POLICY_AFFINITY})
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				made["group"]++
			} else if statusCode(err) != codes.ResourceExhausted {
				t.Errorf("server group: %v", err)
			}
		}()
	}
	wg.Wait()
	if made["network"] != 1 || made["group"] != 1 {
		t.Fatalf("made %v, want one of each", made)
	}
	u := e.wantUsageCounted("p")
	if u.Networks != 1 || u.ServerGroups != 1 {
		t.Fatalf("usage %v", u)
	}
	nws, err := e.nets.ListNetworks(ctx(t), &minicloudv1.ListNetworksRequest{Project: "p"})
	if err != nil {
		t.Fatal(err)
	}
	sgs, err := e.sgs.ListServerGroups(ctx(t), &minicloudv1.ListServerGroupsRequest{Project: "p"})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		e.nets.DeleteNetwork(ctx(t), &minicloudv1.DeleteNetworkRequest{Project: "p", Name: nws.Networks[0].Meta.Name})
		e.sgs.DeleteServerGroup(ctx(t), &minicloudv1.DeleteServerGroupRequest{Project: "p", Name: sgs.ServerGroups[0].Meta.Name})
	}
	if u := e.wantUsageCounted("p"); u.Networks != 0 || u.ServerGroups != 0 {
		t.Fatalf("usage %v after deletes", u)
	}
	// Another project is not touched by p's quota.
	if u := e.getQuota("default").Usage; u.Networks != 1 {
		t.Fatalf("default's usage %v", u)
	}
}

// TestSetQuota: overrides merge field by field over the server's defaults,
// reset drops them, and a negative limit other than -1 is refused.
func TestSetQuota(t *testing.T) {
	e := newEnv(t)
	e.createProjects("p")
	q := e.getQuota("p")
	if q.Limits.GetInstances() != store.Unlimited || q.Overrides.Instances != nil {
		t.Fatalf("quota of a new project without defaults: %v", q)
	}
	e.setQuota("p", &minicloudv1.QuotaLimits{Instances: i64(3)})
	e.setQuota("p", &minicloudv1.QuotaLimits{Vcpus: i64(8)})
	q = e.getQuota("p")
	if q.Limits.GetInstances() != 3 || q.Limits.GetVcpus() != 8 || q.Limits.GetNetworks() != store.Unlimited {
		t.Fatalf("merged limits %v", q.Limits)
	}
	q, err := e.quotas().SetQuota(ctx(t), &minicloudv1.SetQuotaRequest{Project: "p", ResetToDefaults: true, Limits: &minicloudv1.QuotaLimits{Networks: i64(0)}})
	if err != nil {
		t.Fatal(err)
	}
	if q.Overrides.Instances != nil || q.Limits.GetNetworks() != 0 {
		t.Fatalf("after reset: %v", q)
	}
	_, err = e.quotas().SetQuota(ctx(t), &minicloudv1.SetQuotaRequest{Project: "p", Limits: &minicloudv1.QuotaLimits{Vcpus: i64(-2)}})
	wantCode(t, err, codes.InvalidArgument, "quota vcpus -2")
	_, err = e.quotas().GetQuota(ctx(t), &minicloudv1.GetQuotaRequest{Project: "Not_A_Label"})
	wantCode(t, err, codes.InvalidArgument, "not a DNS label")
}

// TestCreateVMImageVisibility: a VM boots only from a public image or one
// of its own project; another project's private image is NotFound.
func TestCreateVMImageVisibility(t *testing.T) {
	e := newEnv(t)
	e.seed()
	put := func(name, owner string, vis minicloudv1.ImageVisibility) {
		v, _ := store.Marshal(&minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Id: name, Name: name, Project: owner}, Visibility: vis,
			Format: minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2, Disk: &minicloudv1.ImageBlob{Sha256: strings.Repeat("0", 64), SizeBytes: 1}})
		if _, err := e.etcd.Put(ctx(t), store.ImageKey(name), v); err != nil {
			t.Fatal(err)
		}
	}
	put("mine", "default", minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE)
	put("theirs", "other", minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE)
	put("shared", "other", minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC)
	e.createVM("a", func(r *minicloudv1.CreateVMRequest) { r.Spec.Image = "mine" })
	e.createVM("b", func(r *minicloudv1.CreateVMRequest) { r.Spec.Image = "shared" })
	e.createVM("c") // "debian": no owner, from before images had one
	_, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "d", Spec: &minicloudv1.VMSpec{Image: "theirs", Flavor: "small"}})
	wantCode(t, err, codes.NotFound, "image theirs not found")
}
