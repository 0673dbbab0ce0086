package server_test

import (
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

func fwd(host, guest int32) *minicloudv1.PortForward {
	return &minicloudv1.PortForward{HostPort: host, GuestPort: guest}
}

// TestExposeVMPort: a forward goes into the spec with its cluster-wide
// claim in one transaction; a second VM cannot take the port, and learns
// who holds it; the claim goes with unexpose and with the VM.
func TestExposeVMPort(t *testing.T) {
	e := newEnv(t)
	e.seed()
	a := e.createVM("web1")
	b := e.createVM("web2")
	up, err := e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web1", Forward: fwd(20080, 80)})
	if err != nil {
		t.Fatal(err)
	}
	if got := up.GetSpec().GetPortForwards(); len(got) != 1 || got[0].GetProtocol() != minicloudv1.PortProtocol_PORT_PROTOCOL_TCP || got[0].GetGuestPort() != 80 {
		t.Fatalf("forwards = %v", got)
	}
	if up.Spec.LifecycleVersion != a.Meta.ResourceVersion {
		t.Fatalf("lifecycle version %d, want %d (an expose is no start request)", up.Spec.LifecycleVersion, a.Meta.ResourceVersion)
	}
	key := store.PortForwardKey(minicloudv1.PortProtocol_PORT_PROTOCOL_TCP, 20080)
	if r, err := e.etcd.Get(ctx(t), key); err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != a.Meta.Id {
		t.Fatalf("claim %s = %v, %v", key, r, err)
	}
	// The same again is a no-op; another guest port on the same host port is not.
	again, err := e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web1", Forward: fwd(20080, 80)})
	if err != nil || again.Meta.ResourceVersion != up.Meta.ResourceVersion {
		t.Fatalf("repeat: %v %v", again, err)
	}
	_, err = e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web1", Forward: fwd(20080, 81)})
	wantCode(t, err, codes.AlreadyExists, "unexpose it first")
	_, err = e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web2", Forward: fwd(20080, 80)})
	wantCode(t, err, codes.AlreadyExists, "already forwarded to vm web1")
	// UDP is another port space.
	if _, err := e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web2",
		Forward: &minicloudv1.PortForward{Protocol: minicloudv1.PortProtocol_PORT_PROTOCOL_UDP, HostPort: 20080, GuestPort: 53}}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		f    *minicloudv1.PortForward
		want string
	}{
		{fwd(80, 80), "metadata service"},
		{fwd(8640, 80), "minicloud API"},
		{fwd(1000, 80), "outside the range"},
		{fwd(40000, 80), "outside the range"},
		{fwd(20081, 0), "guest port 0"},
		{fwd(20081, 70000), "guest port 70000"},
		{&minicloudv1.PortForward{Protocol: 9, HostPort: 20081, GuestPort: 1}, "want tcp or udp"},
	} {
		_, err := e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web2", Forward: bad.f})
		wantCode(t, err, codes.InvalidArgument, bad.want)
	}
	for i := range store.MaxPortForwardsPerVM - 1 {
		if _, err := e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web2", Forward: fwd(21000+int32(i), 80)}); err != nil {
			t.Fatal(err)
		}
	}
	_, err = e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web2", Forward: fwd(22000, 80)})
	wantCode(t, err, codes.InvalidArgument, "at most 16")

	// Unexpose frees the port for the other VM; unexposing again is fine.
	for range 2 {
		if _, err := e.vms.UnexposeVMPort(ctx(t), &minicloudv1.UnexposeVMPortRequest{Name: "web1", HostPort: 20080}); err != nil {
			t.Fatal(err)
		}
	}
	if r, _ := e.etcd.Get(ctx(t), key); len(r.Kvs) != 0 {
		t.Fatalf("claim %s left after unexpose", key)
	}
	if _, err := e.vms.ExposeVMPort(ctx(t), &minicloudv1.ExposeVMPortRequest{Name: "web1", Forward: fwd(20080, 80)}); err != nil {
		t.Fatal(err)
	}
	// Deleting a VM no host holds releases its claims at once.
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web2"}); err != nil {
		t.Fatal(err)
	}
	r, err := e.etcd.Get(ctx(t), store.PortForwardPrefix, clientv3.WithPrefix())
	if err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != a.Meta.Id {
		t.Fatalf("claims after deleting %s: %v %v", b.Meta.Name, r.Kvs, err)
	}
	// A create may not carry forwards.
	_, err = e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web3", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small",
		PortForwards: []*minicloudv1.PortForward{fwd(20090, 80)}}})
	wantCode(t, err, codes.InvalidArgument, "spec.port_forwards is set by the server")
}
