package invariants

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
	"github.com/minicloud/minicloud/pkg/nic"
	"github.com/minicloud/minicloud/pkg/store"
)

const (
	idA = "0a1b2c3d-0000-4000-8000-000000000001"
	idB = "9f8e7d6c-0000-4000-8000-000000000002"
	idX = "55555555-0000-4000-8000-00000000dead"
)

// cleanSnapshot is a cloud of two VMs, one RUNNING on host1 and one
// STOPPED (as asked) on host2, and hosts that hold exactly their things.
func cleanSnapshot() Snapshot {
	run, stop := minicloudv1.VMPhase_VM_PHASE_RUNNING, minicloudv1.VMPhase_VM_PHASE_STOPPED
	return Snapshot{
		Cloud: Cloud{
			VMs: map[string]VM{
				idA: {ID: idA, Name: "a", Project: "p", Host: "host1", Phase: run,
					Addresses: []Address{{Network: "default", IP: "10.0.0.5", MAC: "52:54:00:00:00:05"}}},
				idB: {ID: idB, Name: "b", Project: "p", Host: "host2", Phase: stop, WantStopped: true,
					Addresses: []Address{{Network: "default", IP: "10.0.0.6", MAC: "52:54:00:00:00:06"}}},
			},
			IPAM: []IPAMEntry{{"net1", "10.0.0.5", idA}, {"net1", "10.0.0.6", idB}},
		},
		Hosts: map[string]Observation{
			"host1": {
				Domains: []Domain{{Name: "mc-" + idA, Running: true}, {Name: "someone-elses"}},
				Links:   []string{"lo", "mcbr-default", nic.TapName(idA, 0), "mcv-adopted"},
				VMDirs:  []string{idA},
				PortElements: []PortElement{{"port_mac", nic.TapName(idA, 0), "52:54:00:00:00:05"},
					{"port_ip4", nic.TapName(idA, 0), "10.0.0.5"}, {"port_ip4", "mcv-adopted", "10.0.0.99"}},
			},
			"host2": {Domains: []Domain{{Name: "mc-" + idB}}, Links: []string{"lo"}, VMDirs: []string{idB}},
			"host3": {},
		},
		HostErrors: map[string]error{},
	}
}

func TestCheckCleanCloudHasNoViolations(t *testing.T) {
	if v := Check(cleanSnapshot(), []string{idX}); len(v) != 0 {
		t.Fatalf("violations in a clean cloud: %v", v)
	}
}

// TestCheckFindsEachViolation breaks the clean cloud one way at a time and
// wants exactly the violations that way names (invariant and a fragment).
func TestCheckFindsEachViolation(t *testing.T) {
	type want struct{ inv, where, detail string }
	cases := []struct {
		name   string
		mutate func(s *Snapshot)
		want   []want
	}{
		{"domain running on two hosts", func(s *Snapshot) {
			o := s.Hosts["host3"]
			o.Domains = append(o.Domains, Domain{Name: "mc-" + idA, Running: true})
			s.Hosts["host3"] = o
		}, []want{{OneDefinition, idA, "defined on host1, host3"}, {OneHost, idA, "running on host1, host3"},
			{Orphan, "host3", "etcd assigns to \"host1\""}}},
		{"domain defined on two hosts", func(s *Snapshot) {
			o := s.Hosts["host3"]
			o.Domains = append(o.Domains, Domain{Name: "mc-" + idB})
			s.Hosts["host3"] = o
		}, []want{{OneDefinition, idB, "defined on host2, host3"}, {Orphan, "host3", "domain mc-" + idB}}},
		{"domain of no VM", func(s *Snapshot) {
			o := s.Hosts["host2"]
			o.Domains = append(o.Domains, Domain{Name: "mc-" + idX})
			s.Hosts["host2"] = o
		}, []want{{Orphan, "host2", "domain mc-" + idX + " belongs to no VM"}}},
		{"tap of no VM", func(s *Snapshot) {
			o := s.Hosts["host2"]
			o.Links = append(o.Links, nic.TapName(idX, 1))
			s.Hosts["host2"] = o
		}, []want{{Orphan, "host2", "tap " + nic.TapName(idX, 1) + " belongs to no VM"}}},
		{"tap on the wrong host", func(s *Snapshot) {
			o := s.Hosts["host2"]
			o.Links = append(o.Links, nic.TapName(idA, 0))
			s.Hosts["host2"] = o
		}, []want{{Orphan, "host2", "tap " + nic.TapName(idA, 0) + " belongs to VM a"}}},
		{"VM directory of no VM", func(s *Snapshot) {
			o := s.Hosts["host3"]
			o.VMDirs = append(o.VMDirs, idX)
			s.Hosts["host3"] = o
		}, []want{{Orphan, "host3", "VM directory " + idX}}},
		{"filter element of no VM", func(s *Snapshot) {
			o := s.Hosts["host1"]
			o.PortElements = append(o.PortElements, PortElement{"port_mac", nic.TapName(idX, 0), "52:54:00:00:00:99"})
			s.Hosts["host1"] = o
		}, []want{{Orphan, "host1", "port_mac element " + nic.TapName(idX, 0)}}},
		{"filter element with an address its VM does not have", func(s *Snapshot) {
			o := s.Hosts["host1"]
			o.PortElements = append(o.PortElements, PortElement{"port_ip4", nic.TapName(idA, 0), "10.0.0.77"})
			s.Hosts["host1"] = o
		}, []want{{Orphan, "host1", "has no such address"}}},
		{"IPAM address of no VM", func(s *Snapshot) {
			s.Cloud.IPAM = append(s.Cloud.IPAM, IPAMEntry{"net1", "10.0.0.9", idX})
		}, []want{{Orphan, "ipam/net1/10.0.0.9", "does not exist"}}},
		{"create never settled", func(s *Snapshot) {
			vm := s.Cloud.VMs[idB]
			vm.Phase = minicloudv1.VMPhase_VM_PHASE_CREATING
			s.Cloud.VMs[idB] = vm
		}, []want{{Settled, "p/b", "still VM_PHASE_CREATING"}}},
		{"ERROR without a reason", func(s *Snapshot) {
			vm := s.Cloud.VMs[idB]
			vm.Phase = minicloudv1.VMPhase_VM_PHASE_ERROR
			s.Cloud.VMs[idB] = vm
		}, []want{{Settled, "p/b", "ERROR without a reason"}}},
		{"STOPPED while asked to run, without a reason", func(s *Snapshot) {
			vm := s.Cloud.VMs[idB]
			vm.WantStopped = false
			s.Cloud.VMs[idB] = vm
		}, []want{{Settled, "p/b", "STOPPED without a reason"}}},
		{"RUNNING in etcd, no domain runs (lost)", func(s *Snapshot) {
			s.Hosts["host1"].Domains[0].Running = false
		}, []want{{Settled, "p/a", "lost"}}},
		{"STOPPED in etcd, its domain runs", func(s *Snapshot) {
			s.Hosts["host2"].Domains[0].Running = true
		}, []want{{Settled, "p/b", "its domain runs on host2"}}},
		{"one address held twice", func(s *Snapshot) {
			vm := s.Cloud.VMs[idB]
			vm.Addresses = append(vm.Addresses, Address{Network: "default", IP: "10.0.0.5"})
			s.Cloud.VMs[idB] = vm
		}, []want{{Unique, "default 10.0.0.5", "held by p/a"}}},
		{"one MAC held twice", func(s *Snapshot) {
			vm := s.Cloud.VMs[idB]
			vm.Addresses[0].MAC = "52:54:00:00:00:05"
			s.Cloud.VMs[idB] = vm
		}, []want{{Unique, "MAC 52:54:00:00:00:05", "held by p/a"}}},
		{"claims", func(s *Snapshot) {
			s.Cloud.ClaimProblems = []string{"host host1: allocation != sum of claims"}
		}, []want{{Claims, "etcd", "allocation != sum"}}},
		{"unreadable host", func(s *Snapshot) {
			delete(s.Hosts, "host3")
			s.HostErrors["host3"] = context.DeadlineExceeded
		}, []want{{Readable, "host3", "deadline"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := cleanSnapshot()
			tc.mutate(&s)
			got := Check(s, nil)
			if len(got) != len(tc.want) {
				t.Fatalf("got %d violations, want %d:\n%s", len(got), len(tc.want), Report{Violations: got})
			}
		next:
			for _, w := range tc.want {
				for _, v := range got {
					if v.Invariant == w.inv && strings.Contains(v.Where, w.where) && strings.Contains(v.Detail, w.detail) {
						continue next
					}
				}
				t.Errorf("no violation %+v in:\n%s", w, Report{Violations: got})
			}
		})
	}
}

func TestCheckDeletesAreFinal(t *testing.T) {
	s := cleanSnapshot()
	// The caller deleted a; every trace of it is a violation.
	got := Check(s, []string{idA})
	var deleted []string
	for _, v := range got {
		if v.Invariant == Deleted {
			deleted = append(deleted, v.Detail)
		}
	}
	for _, frag := range []string{"still in etcd", "ipam/net1/10.0.0.5", "domain mc-" + idA, "VM directory still on host1", "tap " + nic.TapName(idA, 0)} {
		if !strings.Contains(strings.Join(deleted, "\n"), frag) {
			t.Errorf("no deleted violation mentions %q in %q", frag, deleted)
		}
	}
}

func TestParseHostOutputs(t *testing.T) {
	// As nft 1.0.6 prints the agent's sets (captured from a real netns).
	nft := `{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"set": {"family": "bridge", "name": "port_mac", "table": "minicloud", "type": ["ifname", "ether_addr"], "handle": 1, "elem": [{"concat": ["mctabcdef120", "52:54:00:aa:bb:cc"]}]}}]}`
	els, err := parseNftSet([]byte(nft))
	if err != nil || len(els) != 1 || els[0] != (PortElement{"port_mac", "mctabcdef120", "52:54:00:aa:bb:cc"}) {
		t.Fatalf("parseNftSet = %v, %v", els, err)
	}
	empty := `{"nftables": [{"metainfo": {}}, {"set": {"family": "bridge", "name": "port_ip4", "table": "minicloud"}}]}`
	if els, err := parseNftSet([]byte(empty)); err != nil || len(els) != 0 {
		t.Fatalf("empty set = %v, %v", els, err)
	}
	links, err := parseIPLinks([]byte(`[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK"]},{"ifindex":5,"ifname":"mctabcdef120"}]`))
	if err != nil || strings.Join(links, ",") != "lo,mctabcdef120" {
		t.Fatalf("parseIPLinks = %v, %v", links, err)
	}
}

// fakeHosts serves observations from memory: the first `dirty` reads of
// host1 carry a leftover domain, as a host still cleaning up would.
type fakeHosts struct {
	mu    sync.Mutex
	clean map[string]Observation
	dirty int
	reads int
}

func (f *fakeHosts) Names() []string { return []string{"host1", "host2"} }

func (f *fakeHosts) Observe(_ context.Context, host string) (Observation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := f.clean[host]
	if host == "host1" {
		f.reads++
		if f.reads <= f.dirty {
			o.Domains = append(append([]Domain(nil), o.Domains...), Domain{Name: "mc-" + idX, Running: true})
		}
	}
	return o, nil
}

// TestAuditReadsEtcdAndWaitsForConvergence runs Audit on a real (embedded)
// etcd holding a VM written as the API writes it, with fake hosts.
func TestAuditReadsEtcdAndWaitsForConvergence(t *testing.T) {
	_, cli := etcdtest.Start(t)
	ctx := context.Background()
	vm := &minicloudv1.VM{
		Meta: &minicloudv1.ObjectMeta{Id: idA, Name: "a", Project: "p"},
		Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"},
		Status: &minicloudv1.VMStatus{Phase: minicloudv1.VMPhase_VM_PHASE_RUNNING, Host: "host1",
			Addresses: []*minicloudv1.VMAddress{{Network: "default", Ip: "10.0.0.5", Mac: "52:54:00:00:00:05"}}},
	}
	specOp, err := store.VMSpecOp(vm)
	if err != nil {
		t.Fatal(err)
	}
	statusOp, err := store.VMStatusOp(idA, vm.Status)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Txn(ctx).Then(specOp, statusOp).Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, store.IPAMKey("net1", "10.0.0.5"), idA); err != nil {
		t.Fatal(err)
	}
	hosts := &fakeHosts{dirty: 3, clean: map[string]Observation{
		"host1": {Domains: []Domain{{Name: "mc-" + idA, Running: true}}, VMDirs: []string{idA}},
	}}

	var seen []int
	r, err := Audit(ctx, cli, hosts, Options{Settle: 10 * time.Second, Interval: 10 * time.Millisecond,
		Each: func(v []Violation) { seen = append(seen, len(v)) }})
	if err != nil || len(r.Violations) != 0 || r.Snapshots != 4 {
		t.Fatalf("Audit = %s, %v; want it clean at the 4th snapshot", r, err)
	}
	if fmt.Sprint(seen) != "[1 1 1 0]" {
		t.Errorf("Each saw %v violations per snapshot, want [1 1 1 0]", seen)
	}

	// A host that never converges: the last snapshot's violations, after
	// the settle time.
	hosts = &fakeHosts{dirty: 1 << 30, clean: hosts.clean}
	start := time.Now()
	r, err = Audit(ctx, cli, hosts, Options{Settle: 200 * time.Millisecond, Interval: 20 * time.Millisecond})
	if err != nil || len(r.Violations) != 1 || r.Violations[0].Invariant != Orphan {
		t.Fatalf("Audit = %s, %v; want the orphan domain", r, err)
	}
	if time.Since(start) < 180*time.Millisecond {
		t.Errorf("Audit gave up after %s, before the settle time", time.Since(start))
	}
	// Deleted VMs are still in etcd here.
	r, _ = Audit(ctx, cli, &fakeHosts{clean: hosts.clean}, Options{Deleted: []string{idA}})
	if r.Snapshots != 1 || !strings.Contains(r.String(), "deleted: "+idA+": still in etcd") {
		t.Errorf("Audit with a deleted VM present = %s", r)
	}
}
