package server_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/ssh"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/pki"
)

var sshKey2 = newSSHKey("second@host")

// newSSHKey returns a fresh ed25519 key in authorized_keys format.
func newSSHKey(comment string) string {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	k, err := ssh.NewPublicKey(pub)
	if err != nil {
		panic(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k))) + " " + comment
}

func sshFingerprint(t *testing.T, line string) string {
	t.Helper()
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	return ssh.FingerprintSHA256(pub)
}

func TestCreateVMWithLabelsTagsMetadata(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1", func(r *minicloudv1.CreateVMRequest) {
		r.Labels = map[string]string{"env": "prod", "Team": "web ops"}
		r.Spec.Tags = []string{"https", "http", "https"}
		r.Spec.Metadata = map[string]string{"role": "frontend", "startup-script": "#!/bin/sh\necho hi\n"}
	})
	got, err := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []*minicloudv1.VM{vm, got} {
		if v.Meta.Labels["Team"] != "web ops" || fmt.Sprint(v.Spec.Tags) != "[http https]" || v.Spec.Metadata["role"] != "frontend" {
			t.Fatalf("labels/tags/metadata not kept: %v %v %v", v.Meta.Labels, v.Spec.Tags, v.Spec.Metadata)
		}
	}
}

// TestGuestMetadataBounds checks every limit at its value and one byte
// (or one item) over it, at create and at update, and that a refused
// request writes nothing.
func TestGuestMetadataBounds(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createVM("web1")
	n := func(count int, f func(i int) (string, string)) map[string]string {
		m := map[string]string{}
		for i := range count {
			k, v := f(i)
			m[k] = v
		}
		return m
	}
	half := apiserver.MaxMetadataTotalBytes / 2
	cases := []struct {
		name             string
		labels, metadata map[string]string
		tags             []string
		ok               bool
		fragment         string
	}{
		{name: "value at limit", metadata: map[string]string{"k": strings.Repeat("x", apiserver.MaxMetadataValueBytes)}, ok: true},
		{name: "value over", metadata: map[string]string{"k": strings.Repeat("x", apiserver.MaxMetadataValueBytes+1)}, fragment: "at most 262144"},
		// Two values of 256 KiB minus their keys: exactly 512 KiB in all.
		{name: "total at limit", metadata: map[string]string{"a": strings.Repeat("x", half-1), "b": strings.Repeat("x", half-1)}, ok: true},
		{name: "total over", metadata: map[string]string{"a": strings.Repeat("x", half-1), "b": strings.Repeat("x", half)}, fragment: "at most 524288"},
		{name: "keys at limit", metadata: n(apiserver.MaxMetadataKeys, func(i int) (string, string) { return fmt.Sprintf("k%d", i), "v" }), ok: true},
		{name: "keys over", metadata: n(apiserver.MaxMetadataKeys+1, func(i int) (string, string) { return fmt.Sprintf("k%d", i), "v" }), fragment: "at most 128"},
		{name: "metadata key charset", metadata: map[string]string{"a/b": "v"}, fragment: "metadata key \"a/b\" is invalid"},
		{name: "reserved key", metadata: map[string]string{"ssh-keys": "v"}, fragment: "served by minicloud itself"},
		{name: "label value at limit", labels: map[string]string{"k": strings.Repeat("x", apiserver.MaxLabelValueBytes)}, ok: true},
		{name: "label value over", labels: map[string]string{"k": strings.Repeat("x", apiserver.MaxLabelValueBytes+1)}, fragment: "the limit is 255"},
		{name: "label control char", labels: map[string]string{"k": "a\nb"}, fragment: "without control characters"},
		{name: "label key", labels: map[string]string{"1x": "v"}, fragment: "label key \"1x\" is invalid"},
		{name: "labels over", labels: n(apiserver.MaxLabels+1, func(i int) (string, string) { return fmt.Sprintf("k%d", i), "v" }), fragment: "at most 64"},
		{name: "tag", tags: []string{"Not_A_Label"}, fragment: "tag \"Not_A_Label\" is invalid"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := e.dump(t)
			name := fmt.Sprintf("b%d", i)
			_, cerr := e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: name, Labels: c.labels,
				Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", Tags: c.tags, Metadata: c.metadata}})
			var uerr error
			if cerr == nil || !c.ok {
				_, uerr = e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1",
					SetLabels: c.labels, AddTags: c.tags, SetMetadata: c.metadata})
			}
			if c.ok {
				if cerr != nil || uerr != nil {
					t.Fatalf("refused at the limit: create %v, update %v", cerr, uerr)
				}
				// Leave web1 as it was for the next case.
				var rm []string
				for k := range c.metadata {
					rm = append(rm, k)
				}
				var rl []string
				for k := range c.labels {
					rl = append(rl, k)
				}
				if _, err := e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", RemoveMetadata: rm, RemoveLabels: rl}); err != nil {
					t.Fatal(err)
				}
				return
			}
			wantCode(t, cerr, codes.InvalidArgument, c.fragment)
			wantCode(t, uerr, codes.InvalidArgument, c.fragment)
			e.wantUnchanged(t, before)
		})
	}
}

func TestUpdateVMMetadataPatch(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1", func(r *minicloudv1.CreateVMRequest) {
		r.Labels = map[string]string{"env": "dev", "old": "x"}
		r.Spec.Tags = []string{"a"}
		r.Spec.Metadata = map[string]string{"k": "v1", "gone": "x"}
		r.Spec.SshPublicKeys = []string{sshKey}
	})
	up, err := e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{
		Name: "web1", ResourceVersion: vm.Meta.ResourceVersion,
		SetLabels: map[string]string{"env": "prod"}, RemoveLabels: []string{"old", "never-there"},
		AddTags: []string{"b"}, RemoveTags: []string{"a"},
		SetMetadata: map[string]string{"k": "v2"}, RemoveMetadata: []string{"gone"},
		AddSshKeys: []string{sshKey2, sshKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(up.Meta.Labels) != "map[env:prod]" || fmt.Sprint(up.Spec.Tags) != "[b]" || fmt.Sprint(up.Spec.Metadata) != "map[k:v2]" ||
		len(up.Spec.SshPublicKeys) != 2 {
		t.Fatalf("patched: %v %v %v %v", up.Meta.Labels, up.Spec.Tags, up.Spec.Metadata, up.Spec.SshPublicKeys)
	}
	if up.Spec.LifecycleVersion != vm.Meta.ResourceVersion || up.Meta.ResourceVersion <= vm.Meta.ResourceVersion {
		t.Fatalf("versions: lifecycle %d (want %d), resource %d", up.Spec.LifecycleVersion, vm.Meta.ResourceVersion, up.Meta.ResourceVersion)
	}
	// Removing a key by fingerprint.
	fp := sshFingerprint(t, sshKey2)
	up2, err := e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", RemoveSshKeys: []string{fp}})
	if err != nil || fmt.Sprint(up2.Spec.SshPublicKeys) != fmt.Sprint([]string{sshKey}) {
		t.Fatalf("remove key %s: %v %v", fp, up2.GetSpec().GetSshPublicKeys(), err)
	}
	// A second metadata update keeps the lifecycle version; a start clears it.
	if up2.Spec.LifecycleVersion != vm.Meta.ResourceVersion {
		t.Fatalf("lifecycle version moved to %d", up2.Spec.LifecycleVersion)
	}
	started, err := e.vms.StartVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1"})
	if err != nil || started.Spec.LifecycleVersion != 0 {
		t.Fatalf("start: lifecycle %d, %v", started.GetSpec().GetLifecycleVersion(), err)
	}
	// A no-op writes nothing.
	before := e.dump(t)
	if _, err := e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", SetLabels: map[string]string{"env": "prod"}}); err != nil {
		t.Fatal(err)
	}
	e.wantUnchanged(t, before)
	// Contradictions and the server's fields are refused.
	_, err = e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", SetLabels: map[string]string{"a": "b"}, RemoveLabels: []string{"a"}})
	wantCode(t, err, codes.InvalidArgument, "both set and removed")
	_, err = e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", AddSshKeys: []string{"not a key"}})
	wantCode(t, err, codes.InvalidArgument, "add_ssh_keys[0] is not an SSH public key")
	_, err = e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "nope", SetLabels: map[string]string{"a": "b"}})
	wantCode(t, err, codes.NotFound, "vm nope not found")
	_, err = e.vms.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "x", Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "small", LifecycleVersion: 3}})
	wantCode(t, err, codes.InvalidArgument, "spec.lifecycle_version is set by the server")

	evs, err := e.vms.ListVMEvents(ctx(t), &minicloudv1.ListVMEventsRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	var updates []string
	for _, ev := range evs.Events {
		if ev.Reason == "MetadataUpdated" {
			updates = append(updates, ev.Message)
		}
	}
	if len(updates) != 2 || !strings.Contains(updates[0], "labels set: env") || !strings.Contains(updates[0], "metadata removed: gone") ||
		!strings.Contains(updates[1], "SSH keys removed: "+fp) {
		t.Fatalf("MetadataUpdated events: %q", updates)
	}
}

// TestUpdateVMMetadataStaleVersions races updates that all carry the same
// resource version: exactly one wins, the others get FAILED_PRECONDITION
// and leave no trace.
func TestUpdateVMMetadataStaleVersions(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1")
	const n = 16
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		winners []int
		errs    []error
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{
				Name: "web1", ResourceVersion: vm.Meta.ResourceVersion,
				SetMetadata: map[string]string{"writer": fmt.Sprint(i)},
			})
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				winners = append(winners, i)
			} else {
				errs = append(errs, err)
			}
		}()
	}
	wg.Wait()
	if len(winners) != 1 {
		t.Fatalf("%d winners (%v), want exactly 1; errors %v", len(winners), winners, errs)
	}
	for _, err := range errs {
		wantCode(t, err, codes.FailedPrecondition, "vm web1 changed")
	}
	got, err := e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if err != nil || got.Spec.Metadata["writer"] != fmt.Sprint(winners[0]) {
		t.Fatalf("stored writer %q, winner %d (%v)", got.GetSpec().GetMetadata()["writer"], winners[0], err)
	}
	// The old version stays stale.
	_, err = e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", ResourceVersion: vm.Meta.ResourceVersion, SetLabels: map[string]string{"a": "b"}})
	wantCode(t, err, codes.FailedPrecondition, fmt.Sprintf("current is %d", got.Meta.ResourceVersion))
	// Without a version, concurrent patches of different keys all land.
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := e.vms.UpdateVMMetadata(ctx(t), &minicloudv1.UpdateVMMetadataRequest{Name: "web1", SetLabels: map[string]string{fmt.Sprintf("k%d", i): "v"}}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	got, _ = e.vms.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if len(got.Meta.Labels) != n {
		t.Fatalf("%d labels after %d unversioned patches: %v", len(got.Meta.Labels), n, got.Meta.Labels)
	}
}

// TestListVMsWithFullMetadata lists more VMs at the metadata bound than
// fit in gRPC's default 4 MiB answer, through the client package.
func TestListVMsWithFullMetadata(t *testing.T) {
	e := newEnv(t)
	e.seed()
	half := apiserver.MaxMetadataTotalBytes / 2
	full := map[string]string{"a": strings.Repeat("x", half-1), "b": strings.Repeat("y", half-1)}
	for i := range 9 {
		e.createVM(fmt.Sprintf("big%d", i), func(r *minicloudv1.CreateVMRequest) { r.Spec.Metadata = full })
	}
	c, err := client.Dial(ctx(t), e.addr, grpc.WithTransportCredentials(credentials.NewTLS(pki.ClientTLS(e.ca.Pool(), nil, pki.OrgControlPlane))), client.WithToken(e.admin))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	list, err := c.VMs.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{})
	if err != nil {
		t.Fatalf("list 9 VMs of 512 KiB metadata each: %v", err)
	}
	if len(list.Vms) != 9 || list.Vms[8].Spec.Metadata["b"] != full["b"] {
		t.Fatalf("listed %d VMs", len(list.Vms))
	}
}
