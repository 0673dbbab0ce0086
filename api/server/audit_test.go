package server_test

import (
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestAuditLog: allowed and refused mutating calls of authenticated
// callers are recorded with who, project, RPC, object, result and request
// id; unauthenticated attempts, reads and agents' reports are not; the
// token's secret never is; only an admin reads the log.
func TestAuditLog(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createProjects("alpha")
	authc := minicloudv1.NewAuthServiceClient(e.conn)
	mk := func(name, role string) string {
		resp, err := authc.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: name, Project: "alpha", Role: role})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Token
	}
	memberTok, readerTok := mk("mia", "member"), mk("rita", "reader")
	member := minicloudv1.NewNetworkServiceClient(e.userConn(memberTok))
	reader := minicloudv1.NewNetworkServiceClient(e.userConn(readerTok))

	var hdr metadata.MD
	if _, err := member.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "n1", Cidr: "10.9.0.0/24"}, grpc.Header(&hdr)); err != nil {
		t.Fatal(err)
	}
	_, err := reader.DeleteNetwork(metadata.AppendToOutgoingContext(ctx(t), "x-request-id", "req-42"), &minicloudv1.DeleteNetworkRequest{Name: "n1"})
	wantCode(t, err, codes.PermissionDenied, "member")
	if _, err := member.ListNetworks(ctx(t), &minicloudv1.ListNetworksRequest{}); err != nil {
		t.Fatal(err)
	}
	_, err = minicloudv1.NewNetworkServiceClient(e.userConn("")).DeleteNetwork(ctx(t), &minicloudv1.DeleteNetworkRequest{Name: "n1", Project: "alpha"})
	wantCode(t, err, codes.Unauthenticated, "no credentials")
	e.registerHost("h1", "127.0.0.1:1") // an agent's call: not audited

	_, err = minicloudv1.NewAuditServiceClient(e.userConn(memberTok)).ListAuditRecords(ctx(t), &minicloudv1.ListAuditRecordsRequest{})
	wantCode(t, err, codes.PermissionDenied, "admin")
	resp, err := minicloudv1.NewAuditServiceClient(e.conn).ListAuditRecords(ctx(t), &minicloudv1.ListAuditRecordsRequest{Project: "alpha"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range resp.Records {
		got = append(got, strings.Join([]string{r.Principal, r.Project, r.Rpc, r.Object, r.Code}, " "))
		if strings.Contains(r.String(), strings.Split(memberTok, ".")[2]) || strings.Contains(r.String(), strings.Split(readerTok, ".")[2]) {
			t.Fatalf("a token secret is in the audit log: %v", r)
		}
		if r.RequestId == "" || r.Time == nil {
			t.Errorf("record without request id or time: %v", r)
		}
	}
	// The call without credentials is not stored: anyone could fill etcd.
	want := []string{
		"user rita alpha NetworkService/DeleteNetwork n1 PermissionDenied",
		"user mia alpha NetworkService/CreateNetwork n1 OK",
		"user admin alpha AuthService/CreateUser rita OK",
		"user admin alpha AuthService/CreateUser mia OK",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("audit log of project alpha, newest first:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if resp.Records[0].RequestId != "req-42" || resp.Records[1].RequestId != hdr.Get("x-request-id")[0] || resp.Records[1].TokenId == "" {
		t.Fatalf("request ids %q %q (header %v), token id %q", resp.Records[0].RequestId, resp.Records[1].RequestId, hdr, resp.Records[1].TokenId)
	}
	all, err := minicloudv1.NewAuditServiceClient(e.conn).ListAuditRecords(ctx(t), &minicloudv1.ListAuditRecordsRequest{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range all.Records {
		if strings.Contains(r.Rpc, "RegisterHost") || strings.HasPrefix(r.Rpc, "NetworkService/List") {
			t.Errorf("audited a read or an agent's report: %v", r)
		}
	}
	_, err = minicloudv1.NewAuditServiceClient(e.conn).ListAuditRecords(ctx(t), &minicloudv1.ListAuditRecordsRequest{Limit: 5000})
	wantCode(t, err, codes.InvalidArgument, "limit")
}

// TestAuditRecordOfACreateCommitsWithTheVM: a create's record is written
// in the create's own transaction (one etcd round trip for both), once,
// with the outcome OK; a create that fails still gets its record, with
// the error.
func TestAuditRecordOfACreateCommitsWithTheVM(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web")
	_, err := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small"}})
	wantCode(t, err, codes.AlreadyExists, "web")

	resp, err := e.etcd.Get(ctx(t), store.AuditPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, kv := range resp.Kvs {
		r := &minicloudv1.AuditRecord{}
		if err := store.Decode(kv, r); err != nil {
			t.Fatal(err)
		}
		if r.Rpc != "VMService/CreateVM" {
			continue
		}
		got = append(got, r.Object+" "+r.Code)
		if r.Code == "OK" && kv.ModRevision != vm.Meta.ResourceVersion {
			t.Errorf("record of the create at revision %d, the VM at %d: not one transaction", kv.ModRevision, vm.Meta.ResourceVersion)
		}
		if r.Principal == "" || r.RequestId == "" || r.Time == nil {
			t.Errorf("record %v incomplete", r)
		}
	}
	want := []string{"web OK", "web AlreadyExists"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("CreateVM records, oldest first:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
