package server_test

import (
	"crypto/sha256"
	"crypto/tls"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

// newTLSEnv is newEnv: the server always serves TLS, as `minicloudd api`
// does; a second EnsureCA finds the CA the first made.
func newTLSEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	again, err := apiserver.EnsureCA(ctx(t), e.etcd)
	if err != nil || again.Hash() != e.ca.Hash() {
		t.Fatalf("a second EnsureCA made another CA: %v", err)
	}
	return e
}

func (e *env) serverTLS() *tls.Config {
	e.t.Helper()
	certPEM, keyPEM, err := e.ca.Issue(pki.Template{CommonName: "api", Organization: pki.OrgControlPlane,
		IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true, Lifetime: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	cfg, err := pki.ServerTLS(certPEM, keyPEM, e.ca.Pool(), "")
	if err != nil {
		e.t.Fatal(err)
	}
	return cfg
}

func (e *env) controlPlaneTLS() *tls.Config {
	e.t.Helper()
	certPEM, keyPEM, err := e.ca.Issue(pki.Template{CommonName: "api", Organization: pki.OrgControlPlane, Client: true, Lifetime: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		e.t.Fatal(err)
	}
	return pki.ClientTLS(e.ca.Pool(), &pair, pki.OrgHosts)
}

func (e *env) joinToken() string {
	e.t.Helper()
	resp, err := e.hosts.CreateJoinToken(ctx(e.t), &minicloudv1.CreateJoinTokenRequest{})
	if err != nil {
		e.t.Fatal(err)
	}
	if !regexp.MustCompile(`^[a-z0-9]{6}\.[a-z0-9]{16}$`).MatchString(resp.Token) || resp.CaHash != e.ca.Hash() ||
		time.Until(resp.ExpireTime.AsTime()) < 59*time.Minute {
		e.t.Fatalf("join token: %v", resp)
	}
	return resp.Token
}

// hostCreds is what an agent holds after joining.
type hostCreds struct {
	certPEM, keyPEM []byte
	pair            tls.Certificate
	serial          string
}

// join does what `minicloudd agent --join` does: a fresh key, a CSR, and
// JoinHost over a connection that trusts only the pinned CA hash.
func (e *env) join(name, token string) (*hostCreds, error) {
	e.t.Helper()
	key, err := pki.NewKey()
	if err != nil {
		e.t.Fatal(err)
	}
	csr, err := pki.NewCSR(key, name)
	if err != nil {
		e.t.Fatal(err)
	}
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(pki.PinnedClientTLS(e.ca.Hash()))))
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close()
	resp, err := minicloudv1.NewHostServiceClient(conn).JoinHost(ctx(e.t), &minicloudv1.JoinHostRequest{Token: token, HostName: name, CsrPem: csr})
	if err != nil {
		return nil, err
	}
	keyPEM, _ := pki.EncodeKey(key)
	pair, err := tls.X509KeyPair(resp.CertPem, keyPEM)
	if err != nil {
		e.t.Fatalf("joined certificate: %v", err)
	}
	return &hostCreds{certPEM: resp.CertPem, keyPEM: keyPEM, pair: pair, serial: resp.Serial}, nil
}

func (e *env) mustJoin(name string) *hostCreds {
	e.t.Helper()
	c, err := e.join(name, e.joinToken())
	if err != nil {
		e.t.Fatalf("join %s: %v", name, err)
	}
	return c
}

// hostClient is an agent's connection: mTLS with its host certificate.
func (e *env) hostClient(c *hostCreds) minicloudv1.HostServiceClient {
	e.t.Helper()
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(e.ca.Pool(), &c.pair, pki.OrgControlPlane))))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return minicloudv1.NewHostServiceClient(conn)
}

func hostReq(name, addr string) *minicloudv1.RegisterHostRequest {
	return &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: name}, Address: addr,
		Capacity: &minicloudv1.Resources{Vcpus: 8, MemoryMib: 16384, DiskGib: 100}, Hypervisors: []string{"tcg"},
	}}
}

func TestJoinedHostActsOnlyForItself(t *testing.T) {
	e := newTLSEnv(t)
	e.seed()
	c := ctx(t)
	h1 := e.hostClient(e.mustJoin("h1"))
	if _, err := h1.RegisterHost(c, hostReq("h1", "127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	if _, err := h1.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")

	before := e.dump(t)
	_, err := h1.RegisterHost(c, hostReq("h2", "127.0.0.1:2"))
	wantCode(t, err, codes.PermissionDenied, "certificate is for host h1: it cannot act for host h2")
	_, err = h1.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h2"})
	wantCode(t, err, codes.PermissionDenied, "cannot act for host h2")
	_, err = h1.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h2", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING}})
	wantCode(t, err, codes.PermissionDenied, "cannot act for host h2")
	w, err := h1.WatchAssignments(c, &minicloudv1.WatchAssignmentsRequest{Host: "h2"})
	if err == nil {
		_, err = w.Recv()
	}
	wantCode(t, err, codes.PermissionDenied, "cannot act for host h2")
	np, err := h1.WatchNetworkPorts(c, &minicloudv1.WatchNetworkPortsRequest{Host: "h2"})
	if err == nil {
		_, err = np.Recv()
	}
	wantCode(t, err, codes.PermissionDenied, "cannot act for host h2")
	// No certificate: an admin's token is no host's proof, and nothing
	// at all is no proof either.
	admin := minicloudv1.NewHostServiceClient(e.conn)
	_, err = admin.RegisterHost(c, hostReq("h1", "127.0.0.1:3"))
	wantCode(t, err, codes.PermissionDenied, "RegisterHost is for host agents")
	_, err = admin.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"})
	wantCode(t, err, codes.PermissionDenied, "Heartbeat is for host agents")
	_, err = minicloudv1.NewHostServiceClient(e.userConn("")).Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"})
	wantCode(t, err, codes.Unauthenticated, "need the host's client certificate")
	e.wantUnchanged(t, before)

	// A certificate for h2 from a CA of the caller's own making is not even
	// offered (the server names the CAs it accepts), so the call is one
	// without a certificate.
	rogue, err := pki.NewCA("rogue")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, _ := rogue.Issue(pki.Template{CommonName: "h2", Organization: pki.OrgHosts, Client: true, Lifetime: time.Hour})
	pair, _ := tls.X509KeyPair(certPEM, keyPEM)
	_, err = e.hostClient(&hostCreds{pair: pair}).RegisterHost(c, hostReq("h2", "127.0.0.1:2"))
	wantCode(t, err, codes.Unauthenticated, "need the host's client certificate")
	e.wantUnchanged(t, before)

	// Its own host: watch and report work.
	w, err = h1.WatchAssignments(c, &minicloudv1.WatchAssignmentsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := w.Recv(); err != nil || ev.Vm.GetMeta().GetId() != vm.Meta.Id {
		t.Fatalf("own assignments: %v %v", ev, err)
	}
	if _, err := h1.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_CREATING}}); err != nil {
		t.Fatal(err)
	}
	np, err = h1.WatchNetworkPorts(c, &minicloudv1.WatchNetworkPortsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	if snap, err := np.Recv(); err != nil || len(snap.Ports) != 1 || snap.Ports[0].VmId != vm.Meta.Id {
		t.Fatalf("own network ports: %v %v", snap, err)
	}
}

func TestJoinTokenIsOneTimeAndExpires(t *testing.T) {
	e := newTLSEnv(t)
	c := ctx(t)
	token := e.joinToken()
	if _, err := e.join("h1", token); err != nil {
		t.Fatal(err)
	}
	rev := e.rev()
	_, err := e.join("h2", token)
	wantCode(t, err, codes.Unauthenticated, "is unknown, already used or expired")

	// A wrong secret does not spend the token.
	t2 := e.joinToken()
	_, err = e.join("h2", t2[:7]+"aaaaaaaaaaaaaaaa")
	wantCode(t, err, codes.Unauthenticated, "is unknown, already used or expired")
	_, err = e.join("h2", "not-a-token")
	wantCode(t, err, codes.Unauthenticated, "malformed")

	// Expired (its lease has not run out yet: expiry is checked on use).
	secret := "abcdefghijklmnop"
	sum := sha256.Sum256([]byte(secret))
	if err := store.CreateJoinToken(c, e.etcd, "old123", &minicloudv1.JoinToken{SecretSha256: sum[:], ExpireTime: timestamppb.New(time.Now().Add(-time.Minute))}); err != nil {
		t.Fatal(err)
	}
	rev = e.rev()
	_, err = e.join("h2", "old123."+secret)
	wantCode(t, err, codes.Unauthenticated, "join token old123 expired at")
	if n := e.writesSince(rev); n != 0 {
		t.Fatalf("refused joins wrote to etcd (%d revisions after %d)", n, rev)
	}
	if _, err := e.join("h2", t2); err != nil {
		t.Fatalf("the token survived a wrong secret, yet: %v", err)
	}
	_, err = e.hosts.CreateJoinToken(c, &minicloudv1.CreateJoinTokenRequest{TtlSeconds: 30 * 24 * 3600})
	wantCode(t, err, codes.InvalidArgument, "out of range")
}

func TestSecondLiveRegistrationIsRefused(t *testing.T) {
	e := newTLSEnv(t)
	c := ctx(t)
	first := e.mustJoin("h1")
	h1 := e.hostClient(first)
	if _, err := h1.RegisterHost(c, hostReq("h1", "127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	if _, err := h1.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	token := e.joinToken()
	rev := e.rev()
	_, err := e.join("h1", token)
	wantCode(t, err, codes.AlreadyExists, "host h1 is registered and up")
	if n := e.writesSince(rev); n != 0 {
		t.Fatalf("a refused join wrote to etcd (%d revisions after %d)", n, rev)
	}
	// Once the first is gone (its lease ended), the name can join again,
	// and the first certificate is revoked by that join.
	alive, _ := e.etcd.Get(c, store.HostAliveKey("h1"))
	if _, err := e.etcd.Revoke(c, clientv3.LeaseID(alive.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	second, err := e.join("h1", token)
	if err != nil {
		t.Fatal(err)
	}
	_, err = h1.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"})
	wantCode(t, err, codes.Unauthenticated, "certificate "+first.serial+" of h1 was revoked")
	if _, err := e.hostClient(second).Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
}

func TestRevokedHostIsRefusedEverywhere(t *testing.T) {
	e := newTLSEnv(t)
	c := ctx(t)
	creds := e.mustJoin("h1")
	h1 := e.hostClient(creds)
	if _, err := h1.RegisterHost(c, hostReq("h1", "127.0.0.1:1")); err != nil {
		t.Fatal(err)
	}
	if _, err := h1.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"}); err != nil {
		t.Fatal(err)
	}
	w, err := h1.WatchAssignments(c, &minicloudv1.WatchAssignmentsRequest{Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := w.Recv(); err != nil || ev.Type != minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK {
		t.Fatalf("bookmark: %v %v", ev, err)
	}
	resp, err := e.hosts.RevokeHost(c, &minicloudv1.RevokeHostRequest{Name: "h1"})
	if err != nil || len(resp.RevokedSerials) != 1 || resp.RevokedSerials[0] != creds.serial {
		t.Fatalf("revoke: %v %v", resp, err)
	}
	// The open stream ends, and every further call is refused.
	_, err = w.Recv()
	wantCode(t, err, codes.Unauthenticated, "was revoked")
	rev := e.rev()
	_, err = h1.Heartbeat(c, &minicloudv1.HeartbeatRequest{Name: "h1"})
	wantCode(t, err, codes.Unauthenticated, "certificate "+creds.serial+" of h1 was revoked")
	_, err = h1.RegisterHost(c, hostReq("h1", "127.0.0.1:1"))
	wantCode(t, err, codes.Unauthenticated, "was revoked")
	if got := e.rev(); got != rev {
		t.Fatalf("calls with a revoked certificate wrote to etcd (revision %d -> %d)", rev, got)
	}
	if h, err := e.hosts.GetHost(c, &minicloudv1.GetHostRequest{Name: "h1"}); err != nil || h.State != minicloudv1.HostState_HOST_STATE_UNREACHABLE {
		t.Fatalf("revoked host: %v %v", h, err)
	}
	_, err = e.hosts.RevokeHost(c, &minicloudv1.RevokeHostRequest{Name: "h1"})
	wantCode(t, err, codes.NotFound, "holds no certificate")
}

func TestPlaintextClientIsToldToUseTLS(t *testing.T) {
	e := newTLSEnv(t)
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rev := e.rev()
	hosts := minicloudv1.NewHostServiceClient(conn)
	_, err = hosts.RegisterHost(ctx(t), hostReq("h1", "127.0.0.1:1"))
	wantCode(t, err, codes.Unauthenticated, "serves TLS only")
	_, err = hosts.JoinHost(ctx(t), &minicloudv1.JoinHostRequest{Token: e.joinToken(), HostName: "h1"})
	wantCode(t, err, codes.Unauthenticated, "serves TLS only")
	_, err = minicloudv1.NewFlavorServiceClient(conn).CreateFlavor(ctx(t), &minicloudv1.CreateFlavorRequest{Name: "x", Vcpus: 1, MemoryMib: 64, DiskGib: 1})
	wantCode(t, err, codes.Unauthenticated, "serves TLS only")
	if n := e.writesSince(rev); n != 1 { // 1: the join token this test made
		t.Fatalf("plaintext calls wrote to etcd (%d revisions after %d)", n, rev)
	}
}

func TestConsoleLogOverMutualTLS(t *testing.T) {
	e := newTLSEnv(t)
	e.seed()
	c := ctx(t)
	// h1's agent serves mTLS with its host certificate and accepts only a
	// control-plane client, as cmd/minicloudd's agent does.
	h1creds := e.mustJoin("h1")
	srvTLS, err := pki.ServerTLS(h1creds.certPEM, h1creds.keyPEM, e.ca.Pool(), pki.OrgControlPlane)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(srvTLS)))
	minicloudv1.RegisterAgentServiceServer(gs, &agentDouble{})
	go gs.Serve(lis)
	defer gs.Stop()
	if _, err := e.hostClient(h1creds).RegisterHost(c, hostReq("h1", lis.Addr().String())); err != nil {
		t.Fatal(err)
	}
	vm := e.createVM("web1")
	e.place(vm.Meta.Id, "h1")
	resp, err := e.vms.GetConsoleLog(c, &minicloudv1.GetConsoleLogRequest{Name: "web1"})
	if err != nil || string(resp.Data) != "login: " {
		t.Fatalf("console over mTLS: %v %v", resp, err)
	}

	// h2 registers h1's agent as its own address: the API, expecting h2's
	// certificate there, refuses to talk to it.
	if _, err := e.hostClient(e.mustJoin("h2")).RegisterHost(c, hostReq("h2", lis.Addr().String())); err != nil {
		t.Fatal(err)
	}
	other := e.createVM("web2")
	e.place(other.Meta.Id, "h2")
	_, err = e.vms.GetConsoleLog(c, &minicloudv1.GetConsoleLogRequest{Name: "web2"})
	wantCode(t, err, codes.Unavailable, "certificate is valid for h1, not h2")

	// A host certificate is not a control-plane certificate: h1's agent
	// refuses another host calling it.
	h2 := e.mustJoin("h3")
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(func() *tls.Config {
		cfg := pki.ClientTLS(e.ca.Pool(), &h2.pair, pki.OrgHosts)
		cfg.ServerName = "h1"
		return cfg
	}())))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = minicloudv1.NewAgentServiceClient(conn).GetConsoleLog(c, &minicloudv1.AgentConsoleLogRequest{VmId: vm.Meta.Id})
	wantCode(t, err, codes.Unavailable, "")
}

// TestConcurrentJoinsLeaveOneValidCertificate: joins of one name race; a
// name ends with exactly one live certificate, every other one issued is
// on the deny-list, and no token is spent without a certificate recorded.
func TestConcurrentJoinsLeaveOneValidCertificate(t *testing.T) {
	e := newTLSEnv(t)
	const n = 6
	tokens := make([]string, n)
	for i := range tokens {
		tokens[i] = e.joinToken()
	}
	type result struct {
		creds *hostCreds
		err   error
	}
	results := make(chan result, n)
	for _, tok := range tokens {
		go func() {
			c, err := e.join("h1", tok)
			results <- result{c, err}
		}()
	}
	var serials []string
	for range n {
		r := <-results
		if r.err != nil {
			wantCode(t, r.err, codes.Aborted, "contention")
			continue
		}
		serials = append(serials, r.creds.serial)
	}
	c := ctx(t)
	live, _ := e.etcd.Get(c, store.HostCertsPrefix("h1"), clientv3.WithPrefix())
	revoked, _ := e.etcd.Get(c, store.RevokedPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	left, _ := e.etcd.Get(c, store.JoinTokenPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if len(serials) == 0 || len(live.Kvs) != 1 || int(revoked.Count) != len(serials)-1 || int(left.Count) != n-len(serials) {
		t.Fatalf("%d joins succeeded; live certificates %d, revoked %d, unspent tokens %d", len(serials), len(live.Kvs), revoked.Count, left.Count)
	}
}

func TestListAndDeleteJoinTokens(t *testing.T) {
	e := newTLSEnv(t)
	c := ctx(t)
	keep, drop := e.joinToken(), e.joinToken()
	list, err := e.hosts.ListJoinTokens(c, &minicloudv1.ListJoinTokensRequest{})
	if err != nil || len(list.Tokens) != 2 {
		t.Fatalf("list: %v %v", list, err)
	}
	for _, tok := range list.Tokens {
		if strings.Contains(tok.String(), keep[7:]) || strings.Contains(tok.String(), drop[7:]) {
			t.Fatal("a listed token carries its secret")
		}
	}
	if _, err := e.hosts.DeleteJoinToken(c, &minicloudv1.DeleteJoinTokenRequest{Id: drop}); err != nil {
		t.Fatal(err)
	}
	_, err = e.join("h1", drop)
	wantCode(t, err, codes.Unauthenticated, "unknown, already used or expired")
	_, err = e.hosts.DeleteJoinToken(c, &minicloudv1.DeleteJoinTokenRequest{Id: drop[:6]})
	wantCode(t, err, codes.NotFound, "does not exist")
	_, err = e.hosts.DeleteJoinToken(c, &minicloudv1.DeleteJoinTokenRequest{Id: "../x"})
	wantCode(t, err, codes.InvalidArgument, "6 characters")
	if _, err := e.join("h1", keep); err != nil {
		t.Fatal(err)
	}
	if list, _ := e.hosts.ListJoinTokens(c, &minicloudv1.ListJoinTokensRequest{}); len(list.Tokens) != 0 {
		t.Fatalf("spent and deleted tokens still listed: %v", list)
	}
}

// TestJoinTokensAreBounded: at most store.MaxJoinTokens live join tokens;
// deleting one makes room again.
func TestJoinTokensAreBounded(t *testing.T) {
	e := newTLSEnv(t)
	c := ctx(t)
	var last string
	for range store.MaxJoinTokens {
		resp, err := e.hosts.CreateJoinToken(c, &minicloudv1.CreateJoinTokenRequest{})
		if err != nil {
			t.Fatal(err)
		}
		last = resp.Token
	}
	before := e.dump(t)
	_, err := e.hosts.CreateJoinToken(c, &minicloudv1.CreateJoinTokenRequest{})
	wantCode(t, err, codes.ResourceExhausted, "join tokens are live")
	e.wantUnchanged(t, before)
	if _, err := e.hosts.DeleteJoinToken(c, &minicloudv1.DeleteJoinTokenRequest{Id: last[:6]}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hosts.CreateJoinToken(c, &minicloudv1.CreateJoinTokenRequest{}); err != nil {
		t.Fatalf("after a delete: %v", err)
	}
}
