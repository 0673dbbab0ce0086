package server_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

// env is a real embedded etcd and a real API server on a loopback port,
// with generated clients.
type env struct {
	t      *testing.T
	etcd   *clientv3.Client
	srv    *apiserver.Server
	addr   string
	conn   *grpc.ClientConn
	vms    minicloudv1.VMServiceClient
	flv    minicloudv1.FlavorServiceClient
	nets   minicloudv1.NetworkServiceClient
	sgs    minicloudv1.ServerGroupServiceClient
	hosts  minicloudv1.HostServiceClient
	images minicloudv1.ImageServiceClient

	// ca is the cluster CA: the server serves TLS with a certificate from
	// it, and the clients trust it.
	ca *pki.CA
	// admin is the bootstrap admin's token, which the clients send.
	admin string
	// hostConns are agents' connections, by host name (see hostRouter).
	hostConns map[string]*grpc.ClientConn
	// reserved is the server's Config.ReservedCIDRs (set before start).
	reserved []netip.Prefix
}

// newEnv starts etcd, the cluster CA, the bootstrap admin and the server,
// as `minicloudd api` does; the clients are the admin's.
func newEnv(t *testing.T) *env {
	t.Helper()
	_, cli := etcdtest.Start(t)
	ca, err := apiserver.EnsureCA(ctx(t), cli)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := apiserver.BootstrapAdmin(ctx(t), cli, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, etcd: cli, ca: ca, admin: admin, hostConns: map[string]*grpc.ClientConn{}}
	e.start()
	return e
}

// start (re)starts the API server on a fresh port and reconnects clients.
func (e *env) start() {
	e.t.Helper()
	e.srv, e.addr = e.serve(apiserver.Config{Client: e.etcd, ImageDir: e.t.TempDir(), Logger: slog.New(slog.DiscardHandler),
		CA: e.ca, TLS: e.serverTLS(), AgentTLS: e.controlPlaneTLS(), ReservedCIDRs: e.reserved})
	clear(e.hostConns)
	conn := e.userConn(e.admin)
	e.conn = conn
	e.vms = minicloudv1.NewVMServiceClient(conn)
	e.flv = minicloudv1.NewFlavorServiceClient(conn)
	e.nets = minicloudv1.NewNetworkServiceClient(conn)
	e.sgs = minicloudv1.NewServerGroupServiceClient(conn)
	e.hosts = &hostRouter{HostServiceClient: minicloudv1.NewHostServiceClient(conn), e: e}
	e.images = minicloudv1.NewImageServiceClient(conn)
	e.t.Cleanup(e.stop)
}

// serve starts an API server with cfg on a loopback port.
func (e *env) serve(cfg apiserver.Config) (*apiserver.Server, string) {
	e.t.Helper()
	srv, err := apiserver.New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	go srv.Serve(lis)
	return srv, lis.Addr().String()
}

// replicaServer starts another API server on e's etcd (as a second
// replica of the cluster would be) and returns it and its address.
func (e *env) replicaServer() (*apiserver.Server, string) {
	e.t.Helper()
	srv, addr := e.serve(apiserver.Config{Client: e.etcd, Logger: slog.New(slog.DiscardHandler), CA: e.ca, TLS: e.serverTLS(), AgentTLS: e.controlPlaneTLS()})
	e.t.Cleanup(srv.GRPCServer().Stop)
	return srv, addr
}

// userConn is a user's connection: TLS trusting the CA, and token.
func (e *env) userConn(token string) *grpc.ClientConn {
	e.t.Helper()
	return e.userConnTo(e.addr, token)
}

// userConnTo is userConn to the server at addr.
func (e *env) userConnTo(addr, token string) *grpc.ClientConn {
	e.t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(e.ca.Pool(), nil, pki.OrgControlPlane)))}
	if token != "" {
		opts = append(opts, client.WithToken(token))
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return conn
}

// hostConn is host's agent connection: mTLS with a host certificate for
// name straight from the CA (join is tested in join_test.go).
func (e *env) hostConn(name string) *grpc.ClientConn {
	e.t.Helper()
	if c, ok := e.hostConns[name]; ok {
		return c
	}
	conn := e.hostConnTo(e.addr, name)
	e.hostConns[name] = conn
	return conn
}

// hostConnTo is a connection as host name to the server at addr.
func (e *env) hostConnTo(addr, name string) *grpc.ClientConn {
	e.t.Helper()
	certPEM, keyPEM, err := e.ca.Issue(pki.Template{CommonName: name, Organization: pki.OrgHosts, Client: true, Server: true, Lifetime: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		e.t.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(e.ca.Pool(), &pair, pki.OrgControlPlane))))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return conn
}

// hostServerTLS is the serving configuration of host name's agent: mTLS,
// only the control plane may call.
func (e *env) hostServerTLS(name string) *tls.Config {
	e.t.Helper()
	certPEM, keyPEM, err := e.ca.Issue(pki.Template{CommonName: name, Organization: pki.OrgHosts, IPs: []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames: []string{name}, Client: true, Server: true, Lifetime: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	cfg, err := pki.ServerTLS(certPEM, keyPEM, e.ca.Pool(), pki.OrgControlPlane)
	if err != nil {
		e.t.Fatal(err)
	}
	return cfg
}

// hostRouter is the HostService client of the tests: the admin's calls go
// over the admin's connection, each agent call over the connection of the
// host it names, as that host's agent would make it.
type hostRouter struct {
	minicloudv1.HostServiceClient
	e *env
}

func (h *hostRouter) as(host string) minicloudv1.HostServiceClient {
	return minicloudv1.NewHostServiceClient(h.e.hostConn(host))
}

func (h *hostRouter) RegisterHost(ctx context.Context, req *minicloudv1.RegisterHostRequest, opts ...grpc.CallOption) (*minicloudv1.RegisterHostResponse, error) {
	return h.as(req.GetHost().GetMeta().GetName()).RegisterHost(ctx, req, opts...)
}

func (h *hostRouter) Heartbeat(ctx context.Context, req *minicloudv1.HeartbeatRequest, opts ...grpc.CallOption) (*minicloudv1.HeartbeatResponse, error) {
	return h.as(req.GetName()).Heartbeat(ctx, req, opts...)
}

func (h *hostRouter) WatchAssignments(ctx context.Context, req *minicloudv1.WatchAssignmentsRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[minicloudv1.AssignmentEvent], error) {
	return h.as(req.GetHost()).WatchAssignments(ctx, req, opts...)
}

func (h *hostRouter) ReportVMStatus(ctx context.Context, req *minicloudv1.ReportVMStatusRequest, opts ...grpc.CallOption) (*minicloudv1.ReportVMStatusResponse, error) {
	return h.as(req.GetHost()).ReportVMStatus(ctx, req, opts...)
}

func (h *hostRouter) WatchNetworkPorts(ctx context.Context, req *minicloudv1.WatchNetworkPortsRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[minicloudv1.NetworkPortsSnapshot], error) {
	return h.as(req.GetHost()).WatchNetworkPorts(ctx, req, opts...)
}

// createProjects makes projects as the admin.
func (e *env) createProjects(names ...string) {
	e.t.Helper()
	for _, n := range names {
		if _, err := minicloudv1.NewAuthServiceClient(e.conn).CreateProject(ctx(e.t), &minicloudv1.CreateProjectRequest{Name: n}); err != nil {
			e.t.Fatalf("create project %s: %v", n, err)
		}
	}
}

// stop kills the server without waiting for calls, like a crash would.
func (e *env) stop() {
	if e.conn != nil {
		e.conn = nil
	}
	if e.srv != nil {
		e.srv.GRPCServer().Stop()
		e.srv = nil
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// seed creates image debian, flavors small/tiny and network default.
func (e *env) seed() {
	e.t.Helper()
	c := ctx(e.t)
	e.putImage("debian", 0)
	for _, f := range []*minicloudv1.CreateFlavorRequest{
		{Name: "small", Vcpus: 1, MemoryMib: 1024, DiskGib: 4},
		{Name: "tiny", Vcpus: 1, MemoryMib: 256, DiskGib: 1},
	} {
		if _, err := e.flv.CreateFlavor(c, f); err != nil {
			e.t.Fatal(err)
		}
	}
	if _, err := e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.99.0.0/24"}); err != nil {
		e.t.Fatal(err)
	}
}

// putImage stores image metadata directly: uploads are the image service's
// business and tested there.
func (e *env) putImage(name string, minDisk int64) {
	e.t.Helper()
	v, _ := store.Marshal(&minicloudv1.Image{Meta: &minicloudv1.ObjectMeta{Id: name + "-id", Name: name}, MinDiskGib: minDisk,
		Format: minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2, Disk: &minicloudv1.ImageBlob{Sha256: strings.Repeat("0", 64), SizeBytes: 1}})
	if _, err := e.etcd.Put(ctx(e.t), store.ImageKey(name), v); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) createVM(name string, mutate ...func(*minicloudv1.CreateVMRequest)) *minicloudv1.VM {
	e.t.Helper()
	req := &minicloudv1.CreateVMRequest{Name: name, Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}}
	for _, m := range mutate {
		m(req)
	}
	vm, err := e.vms.CreateVM(ctx(e.t), req)
	if err != nil {
		e.t.Fatalf("create vm %s: %v", name, err)
	}
	return vm
}

// dump returns every minicloud key and value.
func (e *env) dump(t *testing.T) map[string]string {
	t.Helper()
	resp, err := e.etcd.Get(ctx(t), store.Prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]string, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		// A refused call still leaves its audit record (TestAuditLog):
		// "nothing written" means nothing else.
		if strings.HasPrefix(string(kv.Key), store.AuditPrefix) {
			continue
		}
		out[string(kv.Key)] = string(kv.Value)
	}
	return out
}

// wantUnchanged fails if the store differs from before.
func (e *env) wantUnchanged(t *testing.T, before map[string]string) {
	t.Helper()
	after := e.dump(t)
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("store changed: keys before %v, after %v", keys(before), keys(after))
	}
}

func (e *env) rev() int64 {
	e.t.Helper()
	resp, err := e.etcd.Get(ctx(e.t), "rev")
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.Header.Revision
}

// writesSince counts the etcd revisions after rev that wrote anything but
// audit records (every call leaves one of those, refused calls too).
func (e *env) writesSince(rev int64) int {
	e.t.Helper()
	cur := e.rev()
	if cur == rev {
		return 0
	}
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	revs := map[int64]bool{}
	for wr := range e.etcd.Watch(c, store.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
		if err := wr.Err(); err != nil {
			e.t.Fatal(err)
		}
		for _, ev := range wr.Events {
			if !strings.HasPrefix(string(ev.Kv.Key), store.AuditPrefix) {
				revs[ev.Kv.ModRevision] = true
			}
			if ev.Kv.ModRevision >= cur {
				return len(revs)
			}
		}
	}
	e.t.Fatalf("history after revision %d did not reach %d", rev, cur)
	return 0
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// place does what the scheduler does: claims capacity on host and sets
// status.host in one transaction.
func (e *env) place(vmID, host string) {
	e.t.Helper()
	if err := e.tryPlace(vmID, host); err != nil {
		e.t.Fatal(err)
	}
}

// tryPlace is place returning its failure.
func (e *env) tryPlace(vmID, host string) error {
	c := ctx(e.t)
	vm, err := store.GetVM(c, e.etcd, vmID)
	if err != nil {
		return err
	}
	st, err := store.ReadClaimState(c, e.etcd, host, vmID)
	if err != nil {
		return err
	}
	cmps, ops, _, err := store.AddClaimOps(&minicloudv1.Claim{VmId: vmID, Host: host, Resources: vm.Spec.Resources}, st.Alloc, st.AllocModRevision)
	if err != nil {
		return err
	}
	next := proto.CloneOf(vm.Status)
	next.Host, next.Phase = host, minicloudv1.VMPhase_VM_PHASE_SCHEDULED
	next.AssignmentEpoch++
	op, _ := store.VMStatusOp(vmID, next)
	cmps = append(cmps, store.Unchanged(store.VMStatusKey(vmID), vm.Status.StatusVersion))
	if _, ok, err := store.Commit(c, e.etcd, cmps, append(ops, op)); err != nil || !ok {
		return fmt.Errorf("place %s on %s: %v %v", vmID, host, ok, err)
	}
	return nil
}

func (e *env) registerHost(name, addr string) {
	e.t.Helper()
	_, err := e.hosts.RegisterHost(ctx(e.t), &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: name}, Address: addr,
		Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 16384, DiskGib: 100}, Hypervisors: []string{"tcg"},
	}})
	if err != nil {
		e.t.Fatalf("register host %s: %v", name, err)
	}
}

// wantCode fails unless err has code and a message containing fragment.
func wantCode(t *testing.T, err error, code codes.Code, fragment string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
	if !strings.Contains(status.Convert(err).Message(), fragment) {
		t.Fatalf("message %q does not mention %q", status.Convert(err).Message(), fragment)
	}
}

// checkConsistent verifies the store invariants a crash must never break:
// every VM has spec, status and name index; every name index and address
// points at a live VM that has that address.
func (e *env) checkConsistent() map[string]*minicloudv1.VM {
	e.t.Helper()
	c := ctx(e.t)
	vms, _, err := store.ListVMs(c, e.etcd, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	byID := map[string]*minicloudv1.VM{}
	ownedIPs := map[string]string{}
	for _, vm := range vms {
		byID[vm.Meta.Id] = vm
		if vm.Status.StatusVersion == 0 {
			e.t.Errorf("vm %s has no status key", vm.Meta.Name)
		}
		for _, a := range vm.Status.Addresses {
			if prev, dup := ownedIPs[a.Ip]; dup {
				e.t.Errorf("address %s held by %s and %s", a.Ip, prev, vm.Meta.Id)
			}
			ownedIPs[a.Ip] = vm.Meta.Id
		}
	}
	d := e.dump(e.t)
	for _, k := range keys(d) {
		v := d[k]
		switch {
		case strings.HasPrefix(k, store.VMNamePrefix):
			if vm := byID[v]; vm == nil || store.VMNameKey(vm.Meta.Project, vm.Meta.Name) != k {
				e.t.Errorf("name index %s points at %s, which is not a VM of that name", k, v)
			}
		case strings.HasPrefix(k, store.IPAMPrefix):
			if ownedIPs[store.LastSegment(k)] != v {
				e.t.Errorf("ipam key %s says %s, but that VM does not hold the address", k, v)
			}
		case strings.HasPrefix(k, store.ClaimPrefix):
			host := strings.Split(strings.TrimPrefix(k, store.ClaimPrefix), "/")[0]
			if vm := byID[store.LastSegment(k)]; vm == nil || vm.Status.Host != host {
				e.t.Errorf("claim %s belongs to no VM on host %s", k, host)
			}
		case strings.HasPrefix(k, store.VMStatusPrefix), strings.HasPrefix(k, store.VMUserDataPrefix):
			if byID[store.LastSegment(k)] == nil {
				e.t.Errorf("orphan key %s", k)
			}
		}
	}
	for _, vm := range vms {
		if d[store.VMNameKey(vm.Meta.Project, vm.Meta.Name)] != vm.Meta.Id {
			e.t.Errorf("vm %s has no name index", vm.Meta.Name)
		}
	}
	return byID
}

func statusCode(err error) codes.Code { return status.Code(err) }

func unmarshalString(v string, m proto.Message) error { return proto.Unmarshal([]byte(v), m) }
