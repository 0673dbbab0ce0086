package guestservices

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/minicloud/minicloud/agent"
	"github.com/minicloud/minicloud/agent/guestservices/dhcpserver"
	"github.com/minicloud/minicloud/agent/guestservices/dnsserver"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/metadata"
)

func newServices(t *testing.T) (*Services, *metadata.Directory) {
	t.Helper()
	dir := metadata.NewDirectory()
	md, err := metadata.NewServer(dir, metadata.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return New(dir, md, dhcpserver.New(), dnsserver.New()), dir
}

// bridges of the incremental tests, each with its gateway (none exists on
// the machine: nothing is served, the tables are looked at).
var testBridges = []struct{ name, gateway string }{{"mc-fe000001", "10.97.0.1"}, {"mc-fe000002", "10.98.0.1"}}

// vmGuest is VM number n (its own id and MAC) on bridge b, named name, at
// resource version rv.
func vmGuest(n, b int, name string, rv int64) agent.Guest {
	br := testBridges[b]
	gw := netip.MustParseAddr(br.gateway).As4()
	return agent.Guest{VM: &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: fmt.Sprintf("0a000000-0000-4000-8000-%012d", n), Name: name, ResourceVersion: rv},
		Spec: &minicloudv1.VMSpec{},
		Status: &minicloudv1.VMStatus{Addresses: []*minicloudv1.VMAddress{{
			Network: "net", Bridge: br.name, Ip: fmt.Sprintf("%d.%d.0.%d", gw[0], gw[1], 10+n), PrefixLength: 24,
			Gateway: br.gateway, Mac: fmt.Sprintf("52:54:00:00:01:%02x", n),
		}}},
	}}
}

func TestUpdateGuestsAddUpdateRemove(t *testing.T) {
	s, dir := newServices(t)
	ctx := context.Background()
	br := testBridges[0].name
	a, b := vmGuest(1, 0, "web", 5), vmGuest(2, 0, "db", 7)
	if err := s.UpdateGuests(ctx, []agent.Guest{a, b}, nil); err != nil {
		t.Fatal(err)
	}
	z, ok := s.dns.Zone(br)
	if !ok || !reflect.DeepEqual(z.Records, map[string]netip.Addr{"web": netip.MustParseAddr("10.97.0.11"), "db": netip.MustParseAddr("10.97.0.12")}) {
		t.Fatalf("zone after two adds = %v, %v", z, ok)
	}
	if got := len(s.dhcp.Leases(br)); got != 2 || dir.Len() != 2 {
		t.Fatalf("%d leases, %d instances after two adds; want 2 and 2", got, dir.Len())
	}

	// A rename (a newer version) moves its DNS name and lease hostname.
	a2 := vmGuest(1, 0, "www", 6)
	if err := s.UpdateGuests(ctx, []agent.Guest{a2}, nil); err != nil {
		t.Fatal(err)
	}
	z, _ = s.dns.Zone(br)
	if _, old := z.Records["web"]; old || z.Records["www"] != netip.MustParseAddr("10.97.0.11") {
		t.Errorf("zone after a rename = %v; want www, not web", z.Records)
	}
	if inst, _ := dir.Get(a.VM.Meta.Id); inst.Hostname != "www" {
		t.Errorf("metadata hostname after a rename = %q", inst.Hostname)
	}

	// An older version than the one served is ignored.
	if err := s.UpdateGuests(ctx, []agent.Guest{vmGuest(1, 0, "stale", 4)}, nil); err != nil {
		t.Fatal(err)
	}
	z, _ = s.dns.Zone(br)
	if _, stale := z.Records["stale"]; stale || z.Records["www"] != netip.MustParseAddr("10.97.0.11") {
		t.Errorf("zone after a stale update = %v; want www kept", z.Records)
	}
	if inst, _ := dir.Get(a.VM.Meta.Id); inst.Hostname != "www" {
		t.Errorf("a stale update reached the metadata directory: hostname %q", inst.Hostname)
	}

	// A removal is gone from every service at once.
	if err := s.UpdateGuests(ctx, nil, []string{b.VM.Meta.Id}); err != nil {
		t.Fatal(err)
	}
	z, _ = s.dns.Zone(br)
	if _, left := z.Records["db"]; left {
		t.Errorf("removed VM still in DNS: %v", z.Records)
	}
	if _, left := dir.Lookup(br, netip.MustParseAddr("10.97.0.12")); left {
		t.Errorf("removed VM still in the metadata directory")
	}
	if ls := s.dhcp.Leases(br); len(ls) != 1 || ls[0].Hostname != "www" {
		t.Errorf("leases after a removal = %v; want www's only", ls)
	}

	// The last guest of a bridge gone, the bridge is not served.
	if err := s.UpdateGuests(ctx, nil, []string{a.VM.Meta.Id}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.dns.Zone(br); ok || len(s.Bridges()) != 0 || dir.Len() != 0 || len(s.dhcp.Leases(br)) != 0 {
		t.Errorf("empty host: zone %v, bridges %v, %d instances, leases %v", ok, s.Bridges(), dir.Len(), s.dhcp.Leases(br))
	}
}

// TestUpdateGuestsEqualsRebuild: after a random sequence of adds, updates
// (renames, moves between bridges, new user-data), stale updates,
// removals and peer sets, what DHCP, DNS and the metadata directory hold
// is exactly what a from-scratch build of the final set holds.
func TestUpdateGuestsEqualsRebuild(t *testing.T) {
	names := []string{"a", "b", "c", "shared", "Shared"}
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 15))
		s, _ := newServices(t)
		ctx := context.Background()
		model := map[string]agent.Guest{} // what should be served, by id
		version := map[int]int64{}        // last version given, by VM number
		var ports []*minicloudv1.NetworkPort
		for range 60 {
			n := rng.IntN(10)
			id := vmGuest(n, 0, "", 0).VM.Meta.Id
			switch op := rng.IntN(10); {
			case op < 6: // add or update
				version[n] += 1 + int64(rng.IntN(3))
				g := vmGuest(n, rng.IntN(2), names[rng.IntN(len(names))], version[n])
				if rng.IntN(3) == 0 {
					g.UserData = []byte(fmt.Sprint("#cloud-config\n# ", rng.IntN(2)))
				}
				model[id] = g
				if err := s.UpdateGuests(ctx, []agent.Guest{g}, nil); err != nil {
					t.Fatal(err)
				}
			case op < 7: // stale: an older version than the one served
				if version[n] < 2 {
					continue
				}
				g := vmGuest(n, rng.IntN(2), "stale", version[n]-1)
				if _, served := model[id]; !served {
					continue // after a removal, any version is new
				}
				if err := s.UpdateGuests(ctx, []agent.Guest{g}, nil); err != nil {
					t.Fatal(err)
				}
			case op < 9: // remove
				delete(model, id)
				if err := s.UpdateGuests(ctx, nil, []string{id}); err != nil {
					t.Fatal(err)
				}
			default: // the network's VMs on other hosts change
				ports = nil
				for i := range rng.IntN(4) {
					b := testBridges[rng.IntN(2)]
					gw := netip.MustParseAddr(b.gateway).As4()
					ports = append(ports, &minicloudv1.NetworkPort{Bridge: b.name, Hostname: names[rng.IntN(len(names))],
						Ip: fmt.Sprintf("%d.%d.0.%d", gw[0], gw[1], 100+i), Host: "h2"})
				}
				if err := s.SetNetworkPorts(ctx, ports); err != nil {
					t.Fatal(err)
				}
			}
		}
		fresh, _ := newServices(t)
		if err := fresh.SetNetworkPorts(ctx, ports); err != nil {
			t.Fatal(err)
		}
		if err := fresh.SetGuests(ctx, slices.Collect(mapValues(model))); err != nil {
			t.Fatal(err)
		}
		compareServed(t, seed, s, fresh, model)
	}
}

func mapValues(m map[string]agent.Guest) func(func(agent.Guest) bool) {
	return func(yield func(agent.Guest) bool) {
		for _, g := range m {
			if !yield(g) {
				return
			}
		}
	}
}

func compareServed(t *testing.T, seed uint64, got, want *Services, model map[string]agent.Guest) {
	t.Helper()
	if !slices.Equal(got.Bridges(), want.Bridges()) {
		t.Fatalf("seed %d: bridges %v, rebuild %v", seed, got.Bridges(), want.Bridges())
	}
	for _, b := range testBridges {
		gz, gok := got.dns.Zone(b.name)
		wz, wok := want.dns.Zone(b.name)
		if gok != wok || !reflect.DeepEqual(gz, wz) {
			t.Fatalf("seed %d: zone %s = %v (%v), rebuild %v (%v)", seed, b.name, gz, gok, wz, wok)
		}
		if gl, wl := got.dhcp.Leases(b.name), want.dhcp.Leases(b.name); !reflect.DeepEqual(gl, wl) {
			t.Fatalf("seed %d: leases %s = %v, rebuild %v", seed, b.name, gl, wl)
		}
	}
	if got.directory.Len() != len(model) || want.directory.Len() != len(model) {
		t.Fatalf("seed %d: directory holds %d, rebuild %d; want %d", seed, got.directory.Len(), want.directory.Len(), len(model))
	}
	for id, g := range model {
		gi, gok := got.directory.Get(id)
		wi, wok := want.directory.Get(id)
		if !gok || !wok || gi.Fingerprint() != wi.Fingerprint() {
			t.Fatalf("seed %d: directory entry %s differs from the rebuild's (%v, %v)", seed, id, gok, wok)
		}
		a := g.VM.Status.Addresses[0]
		ip := netip.MustParseAddr(a.Ip)
		if li, ok := got.directory.Lookup(a.Bridge, ip); !ok || li.ID != id {
			t.Fatalf("seed %d: lookup of %s on %s = %v, %v; want %s", seed, ip, a.Bridge, li, ok, id)
		}
	}
}
