package server_test

import (
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/pki"
	"github.com/minicloud/minicloud/pkg/store"
)

// revocationBound is how long a change made at another replica may take
// to reach a replica's credentials cache in these tests: the watch's
// latency is milliseconds; the bound is generous for a loaded machine.
const revocationBound = 10 * time.Second

// waitCurrent calls until srv's credentials cache answers calls.
func waitCurrent(t *testing.T, srv *apiserver.Server, call func() error) {
	t.Helper()
	deadline := time.Now().Add(revocationBound)
	for !srv.CredCacheCurrent() {
		if err := call(); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("credentials cache not current after %s", revocationBound)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// refusedWithin calls until the call is refused with code, and fails the
// test if that takes longer than revocationBound.
func refusedWithin(t *testing.T, what string, code codes.Code, call func() error) {
	t.Helper()
	start := time.Now()
	for {
		err := call()
		if err != nil {
			if statusCode(err) != code {
				t.Fatalf("%s: %v, want %s", what, err, code)
			}
			t.Logf("%s: refused after %s", what, time.Since(start))
			return
		}
		if time.Since(start) > revocationBound {
			t.Fatalf("%s: still allowed %s after the change", what, revocationBound)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCredCacheFollowsOtherReplicas: a replica answers from its
// credentials cache, and a token revoked, a user deleted, a role taken
// away or a host certificate revoked elsewhere (straight in etcd, as
// another replica writes it) is refused here within a bounded wait.
func TestCredCacheFollowsOtherReplicas(t *testing.T) {
	e := newEnv(t)
	e.createProjects("alpha")
	authc := minicloudv1.NewAuthServiceClient(e.conn)
	mkUser := func(name string) string {
		resp, err := authc.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: name, Project: "alpha", Role: "member", TokenTtlSeconds: 3600})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Token
	}
	tokenUser, deletedUser, roleUser := mkUser("tina"), mkUser("dan"), mkUser("rosa")
	creds := e.mustJoin("h1")

	srv, addr := e.replicaServer()
	listAs := func(token string) func() error {
		vms := minicloudv1.NewVMServiceClient(e.userConnTo(addr, token))
		return func() error {
			_, err := vms.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{Project: "alpha"})
			return err
		}
	}
	asTina, asDan, asRosa := listAs(tokenUser), listAs(deletedUser), listAs(roleUser)
	hostConn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(e.ca.Pool(), &creds.pair, pki.OrgControlPlane))))
	if err != nil {
		t.Fatal(err)
	}
	defer hostConn.Close()
	host := minicloudv1.NewHostServiceClient(hostConn)
	heartbeat := func() error {
		_, err := host.RegisterHost(ctx(t), hostReq("h1", "127.0.0.1:1"))
		return err
	}
	waitCurrent(t, srv, asTina)
	hits := srv.CredCacheHits()
	for _, call := range []func() error{asTina, asDan, asRosa, heartbeat} {
		if err := call(); err != nil {
			t.Fatal(err)
		}
	}
	if got := srv.CredCacheHits() - hits; got != 4 {
		t.Fatalf("the cache answered %d of 4 calls, want all", got)
	}

	tina, err := store.ListTokens(ctx(t), e.etcd, "tina")
	if err != nil || len(tina) != 1 {
		t.Fatalf("tina's tokens: %v %v", tina, err)
	}
	if err := store.RevokeToken(ctx(t), e.etcd, "tina", tina[0].GetId()); err != nil {
		t.Fatal(err)
	}
	refusedWithin(t, "revoked token", codes.Unauthenticated, asTina)

	if _, err := store.DeleteUser(ctx(t), e.etcd, "dan"); err != nil {
		t.Fatal(err)
	}
	refusedWithin(t, "deleted user", codes.Unauthenticated, asDan)

	if _, err := store.UpdateUser(ctx(t), e.etcd, "rosa", func(u *minicloudv1.User) error {
		u.Roles = nil
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Without a role in alpha the project is not hers to see.
	refusedWithin(t, "role taken away", codes.NotFound, asRosa)

	if _, err := store.RevokeHost(ctx(t), e.etcd, "h1"); err != nil {
		t.Fatal(err)
	}
	refusedWithin(t, "revoked certificate", codes.Unauthenticated, heartbeat)
}

// TestCredCacheNotCurrentReadsEtcd: a quiet cache stays current (its
// heartbeat is answered); a cache whose watch went silent stops answering
// after the staleness bound, and calls read etcd: a role taken
// away meanwhile is refused although the cache still holds it; a new
// server's cache, not synced yet, reads etcd too.
func TestCredCacheNotCurrentReadsEtcd(t *testing.T) {
	defer apiserver.SetCredTiming(50*time.Millisecond, 300*time.Millisecond)()
	defer apiserver.SetStallableWatches()()
	e := newEnv(t)
	e.createProjects("alpha")
	resp, err := minicloudv1.NewAuthServiceClient(e.conn).CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: "rosa", Project: "alpha", Role: "member", TokenTtlSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	srv, addr := e.replicaServer()
	vms := minicloudv1.NewVMServiceClient(e.userConnTo(addr, resp.Token))
	list := func() error {
		_, err := vms.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{Project: "alpha"})
		return err
	}
	// Not synced yet: the first call starts the cache and reads etcd.
	if srv.CredCacheCurrent() {
		t.Fatal("a new server's cache says it is current before any call")
	}
	if err := list(); err != nil {
		t.Fatal(err)
	}
	if hits := srv.CredCacheHits(); hits != 0 {
		t.Fatalf("an unsynced cache answered %d calls", hits)
	}
	waitCurrent(t, srv, list)
	// Nothing changes for longer than the bound: the progress answers to
	// the heartbeat keep a healthy cache current.
	time.Sleep(time.Second)
	if !srv.CredCacheCurrent() {
		t.Fatal("a quiet cache with a healthy watch stopped answering")
	}

	resume := srv.StallCredWatch()
	defer func() { resume() }()
	if _, err := store.UpdateUser(ctx(t), e.etcd, "rosa", func(u *minicloudv1.User) error {
		u.Roles = nil
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond) // past the staleness bound
	if srv.CredCacheCurrent() {
		t.Fatal("a cache that heard nothing for longer than its bound says it is current")
	}
	hits := srv.CredCacheHits()
	err = list()
	wantCode(t, err, codes.NotFound, "project alpha not found")
	if got := srv.CredCacheHits(); got != hits {
		t.Fatalf("a stale cache answered (%d hits)", got-hits)
	}
	resume()
	resume = func() {}
	waitCurrent(t, srv, func() error { return nil })
	wantCode(t, list(), codes.NotFound, "project alpha not found")
}
