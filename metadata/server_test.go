package metadata

import (
	"crypto/ed25519"
	"crypto/rand"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func TestIdentityRefusals(t *testing.T) {
	e := newTestEnv(t, nil)
	// 127.0.0.9 maps to no instance, 127.0.0.4 claims A's address with
	// another MAC, 127.0.0.5 has A's address and MAC on another bridge.
	for _, from := range []int{9, 4, 5} {
		for _, p := range []string{"/latest/meta-data/instance-id", "/openstack/latest/meta_data.json", "/"} {
			e.expect(from, p, 404, "")
		}
		if got := e.do(from, "GET", "/computeMetadata/v1/instance/id", google); got.code != 404 {
			t.Errorf("GCE from 127.0.0.%d: %d, want 404", from, got.code)
		}
		if got := e.do(from, "PUT", "/latest/api/token", map[string]string{tokenTTLHeader: "60"}); got.code != 404 {
			t.Errorf("token from 127.0.0.%d: %d, want 404", from, got.code)
		}
	}
	if v := counterValue(e.srv.metrics.unknownSources); v < 15 {
		t.Errorf("unknown source counter = %v", v)
	}
	// Removing A makes it unknown too.
	e.dir.Remove(idA)
	e.expect(2, "/latest/meta-data/instance-id", 404, "")
	e.expect(3, "/latest/meta-data/instance-id", 200, idB)
}

func TestRateLimit(t *testing.T) {
	e := newTestEnv(t, func(o *Options) { o.RateLimit = 0.001; o.RateBurst = 3 })
	for i := 0; i < 3; i++ {
		e.expect(2, "/latest/meta-data/instance-id", 200, idA)
	}
	e.expect(2, "/latest/meta-data/instance-id", 429, "")
	e.expect(2, "/openstack/latest/meta_data.json", 429, "")
	// One guest's exhaustion leaves the others alone.
	e.expect(3, "/latest/meta-data/instance-id", 200, idB)
}

func TestLastSeen(t *testing.T) {
	var mu sync.Mutex
	var first []string
	e := newTestEnv(t, func(o *Options) {
		o.OnFirstRequest = func(id string) {
			mu.Lock()
			first = append(first, id)
			mu.Unlock()
		}
	})
	if _, ok := e.srv.LastSeen(idA); ok {
		t.Fatal("seen before any request")
	}
	before := time.Now()
	e.expect(2, "/openstack/latest/meta_data.json", 200, "")
	if at, ok := e.srv.LastSeen(idA); !ok || at.Before(before) {
		t.Fatalf("LastSeen(A) = %v, %v", at, ok)
	}
	if _, ok := e.srv.LastSeen(idB); ok {
		t.Fatal("B seen without a request")
	}
	e.expect(9, "/latest/meta-data/instance-id", 404, "")
	if _, ok := e.srv.LastSeen(idB); ok {
		t.Fatal("an unknown source counted as B")
	}
	e.expect(2, "/latest/meta-data/instance-id", 200, "")
	mu.Lock()
	defer mu.Unlock()
	if len(first) != 1 || first[0] != idA {
		t.Fatalf("OnFirstRequest calls = %v, want exactly one for A", first)
	}
}

func TestDirectory(t *testing.T) {
	d := NewDirectory()
	a := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	b := testInstance(idB, "web2", "10.0.0.6", "52:54:00:00:00:0b")
	if err := d.Set([]*Instance{a, b}); err != nil {
		t.Fatal(err)
	}
	if got, ok := d.Lookup("mc-test", netip.MustParseAddr("10.0.0.5")); !ok || got.ID != idA {
		t.Fatalf("lookup A: %v %v", got, ok)
	}
	if _, ok := d.Lookup("mc-other", netip.MustParseAddr("10.0.0.5")); ok {
		t.Fatal("same address on another bridge must not match")
	}
	if got, ok := d.Lookup("mc-test", netip.MustParseAddr("::ffff:10.0.0.6")); !ok || got.ID != idB {
		t.Fatal("v4-mapped source must match")
	}

	// An identical upsert keeps the entry (no wake-up); a change replaces it.
	old := d.current(idA)
	same := *a
	if err := d.Upsert(&same); err != nil {
		t.Fatal(err)
	}
	if d.current(idA) != old {
		t.Fatal("unchanged instance got a new entry")
	}
	changed := *a
	changed.InstanceType = "large"
	if err := d.Upsert(&changed); err != nil {
		t.Fatal(err)
	}
	select {
	case <-old.changed:
	default:
		t.Fatal("change did not close the old entry's channel")
	}

	// Two instances claiming one address: neither is answered.
	dup := testInstance("0c1b2c3d-0000-4000-8000-00000000000c", "web3", "10.0.0.6", "52:54:00:00:00:0c")
	if err := d.Upsert(dup); err != nil {
		t.Fatal(err)
	}
	if _, ok := d.Lookup("mc-test", netip.MustParseAddr("10.0.0.6")); ok {
		t.Fatal("ambiguous address must map to nobody")
	}
	// One of them gone, the other is found again.
	d.Remove(dup.ID)
	if got, ok := d.Lookup("mc-test", netip.MustParseAddr("10.0.0.6")); !ok || got.ID != idB {
		t.Fatalf("address claimed by one instance again: lookup %v %v, want %s", got, ok, idB)
	}
	if err := d.Upsert(dup); err != nil {
		t.Fatal(err)
	}

	// Set drops what is not listed.
	if err := d.Set([]*Instance{b}); err != nil {
		t.Fatal(err)
	}
	if _, ok := d.Get(idA); ok || d.Len() != 1 {
		t.Fatal("Set kept an unlisted instance")
	}
	if err := d.Upsert(&Instance{ID: "not-a-uuid"}); err == nil {
		t.Fatal("invalid instance accepted")
	}
}

func TestInstanceFromVM(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	key := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub))) + " alice@laptop"
	vm := &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: idA, Name: "web1", Project: "p1", Labels: map[string]string{"a": "b"}, CreateTime: timestamppb.Now()},
		Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", SshPublicKeys: []string{key, "ssh-ed25519 not-base64!"}, MetadataTokensRequired: true, AvailabilityZone: "eu-west-1a"},
		Status: &minicloudv1.VMStatus{Addresses: []*minicloudv1.VMAddress{{
			Network: "default", Ip: "10.1.0.7", PrefixLength: 24, Gateway: "10.1.0.1", Mac: "52:54:00:aa:bb:cc", Bridge: "mc-1234abcd",
		}}},
	}
	if _, err := InstanceFromVM(vm, nil); err == nil {
		t.Fatal("malformed ssh key accepted")
	}
	vm.Spec.SshPublicKeys = []string{key}
	inst, err := InstanceFromVM(vm, []byte("#!/bin/sh\n"))
	if err != nil {
		t.Fatal(err)
	}
	if inst.Hostname != "web1" || inst.InstanceType != "small" || inst.Image != "debian" || !inst.TokensRequired ||
		inst.Region != "eu-west" || inst.SSHKeys[0].Name != "alice@laptop" || string(inst.UserData) != "#!/bin/sh\n" ||
		inst.Interfaces[0].MTU != 1500 || inst.Interfaces[0].Address.String() != "10.1.0.7/24" || inst.Interfaces[0].Bridge != "mc-1234abcd" {
		t.Errorf("instance = %+v", inst)
	}
	if err := inst.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []func(){
		func() { vm.Meta.Id = "x" },
		func() { vm.Status.Addresses[0].Ip = "10.1.0.999" },
		func() { vm.Status.Addresses[0].PrefixLength = 33 },
		func() { vm.Status.Addresses[0].Mac = "zz" },
	} {
		v := proto.Clone(vm).(*minicloudv1.VM)
		bad()
		if _, err := InstanceFromVM(vm, nil); err == nil {
			t.Errorf("bad VM accepted: %+v", vm)
		}
		vm = v
	}
	// Fingerprints follow content.
	other, _ := InstanceFromVM(vm, []byte("#!/bin/sh\n"))
	if other.Fingerprint() != inst.Fingerprint() {
		t.Fatal("same VM, different fingerprint")
	}
	other.Labels = map[string]string{"a": "c"}
	if other.Fingerprint() == inst.Fingerprint() {
		t.Fatal("label change kept the fingerprint")
	}
}

// staticNeighbours is a neighbour table given by the test (the netlink one
// is exercised by the real-network tests); it counts its lookups.
type staticNeighbours struct {
	macs    map[netip.Addr]net.HardwareAddr
	lookups *atomic.Int64
}

func (n staticNeighbours) LookupMAC(_ string, ip netip.Addr) (net.HardwareAddr, error) {
	n.lookups.Add(1)
	if m, ok := n.macs[ip]; ok {
		return m, nil
	}
	return nil, errNoNeighbour
}

// TestBridgeResolverFailsClosed: with the bridge resolver, a source whose
// MAC the neighbour table does not know, or knows differently, gets nothing.
func TestBridgeResolverFailsClosed(t *testing.T) {
	inst := testInstance(idA, "web1", "127.0.0.2", "52:54:00:00:00:0a")
	inst.Interfaces[0].Bridge = "lo"
	other := testInstance(idB, "web2", "127.0.0.3", "52:54:00:00:00:0b")
	other.Interfaces[0].Bridge = "lo"
	third := testInstance("0c1b2c3d-0000-4000-8000-00000000000c", "web3", "127.0.0.4", "52:54:00:00:00:0c")
	third.Interfaces[0].Bridge = "lo"
	dir := NewDirectory()
	if err := dir.Set([]*Instance{inst, other, third}); err != nil {
		t.Fatal(err)
	}
	neigh := staticNeighbours{lookups: new(atomic.Int64), macs: map[netip.Addr]net.HardwareAddr{
		netip.MustParseAddr("127.0.0.2"): mustMAC("52:54:00:00:00:0a"),
		netip.MustParseAddr("127.0.0.3"): mustMAC("52:54:00:00:00:ff"),
	}}
	srv, err := NewServer(dir, Options{Neighbours: neigh})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeListener(l, bridgeResolver{iface: "lo", neigh: neigh}) }()
	defer func() {
		if err := srv.Close(); err != nil {
			t.Error(err)
		}
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	e := &testEnv{t: t, srv: srv, dir: dir, base: "http://" + l.Addr().String()}
	e.expect(2, "/latest/meta-data/instance-id", 200, idA) // MAC known and right
	e.expect(3, "/latest/meta-data/instance-id", 404, "")  // MAC known and wrong
	e.expect(4, "/latest/meta-data/instance-id", 404, "")  // no neighbour entry
	// An address that maps to no instance never costs a neighbour lookup.
	before := neigh.lookups.Load()
	for i := 0; i < 5; i++ {
		e.expect(9, "/latest/meta-data/instance-id", 404, "")
	}
	if n := neigh.lookups.Load(); n != before {
		t.Errorf("unknown sources caused %d neighbour lookups", n-before)
	}
}
