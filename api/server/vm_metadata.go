package server

import (
	"context"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/crypto/ssh"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/store"
)

// Bounds of what a VM may carry about itself (docs/api.md, "Labels, tags,
// metadata and SSH keys"). The metadata bounds are GCE's: 256 KiB per
// value and 512 KiB per instance, keys and values together; the counts are
// GCE's for labels and tags and Nova's default quota for metadata items.
const (
	MaxLabels          = 64
	MaxLabelValueBytes = 255
	MaxTags            = 64
	MaxMetadataKeys    = 128
	// MaxSSHKeyBytes bounds one authorized_keys line, comment included.
	MaxSSHKeyBytes        = 8 << 10
	MaxMetadataValueBytes = 256 << 10
	MaxMetadataTotalBytes = 512 << 10
	maxMetadataKeyLen     = 128
	maxLabelKeyLen        = 63
)

var (
	labelKey    = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9._-]*$`)
	metadataKey = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	// reservedMetadata are GCE attribute names minicloud fills from other
	// fields; a custom key of the same name would be shadowed.
	reservedMetadata = map[string]string{
		"user-data":          "give user-data with --user-data at create",
		"user-data-encoding": "it says how user-data is encoded",
		"ssh-keys":           "add keys with --ssh-key / --add-ssh-key",
		"sshKeys":            "add keys with --ssh-key / --add-ssh-key",
	}
)

// validateGuestMetadata checks the labels, tags and custom metadata of a VM
// against their bounds; create and update share it so both refuse the same
// thing with the same words.
func validateGuestMetadata(labels map[string]string, tags []string, metadata map[string]string) error {
	if len(labels) > MaxLabels {
		return errdefs.Invalid("%d labels given; a VM has at most %d", len(labels), MaxLabels)
	}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if len(k) > maxLabelKeyLen || !labelKey.MatchString(k) {
			return errdefs.Invalid("label key %q is invalid: use 1-%d letters, digits, '.', '_' and '-', starting with a letter", k, maxLabelKeyLen)
		}
		if err := printableValue("label "+k, labels[k], MaxLabelValueBytes); err != nil {
			return err
		}
	}
	if len(tags) > MaxTags {
		return errdefs.Invalid("%d tags given; a VM has at most %d", len(tags), MaxTags)
	}
	for _, t := range tags {
		if !dnsLabel.MatchString(t) {
			return errdefs.Invalid("tag %q is invalid: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (GCE network tag rules)", t)
		}
	}
	if len(metadata) > MaxMetadataKeys {
		return errdefs.Invalid("%d metadata keys given; a VM has at most %d", len(metadata), MaxMetadataKeys)
	}
	total := 0
	for _, k := range slices.Sorted(maps.Keys(metadata)) {
		if len(k) > maxMetadataKeyLen || !metadataKey.MatchString(k) {
			return errdefs.Invalid("metadata key %q is invalid: use 1-%d letters, digits, '_' and '-'", k, maxMetadataKeyLen)
		}
		if why, ok := reservedMetadata[k]; ok {
			return errdefs.Invalid("metadata key %q is served by minicloud itself: %s", k, why)
		}
		v := metadata[k]
		if len(v) > MaxMetadataValueBytes {
			return errdefs.Invalid("metadata %s is %d bytes; a value holds at most %d (256 KiB)", k, len(v), MaxMetadataValueBytes)
		}
		if !utf8.ValidString(v) {
			return errdefs.Invalid("metadata %s is not UTF-8 text: base64-encode binary data", k)
		}
		total += len(k) + len(v)
	}
	if total > MaxMetadataTotalBytes {
		return errdefs.Invalid("metadata is %d bytes (keys and values); a VM holds at most %d (512 KiB)", total, MaxMetadataTotalBytes)
	}
	return nil
}

// printableValue refuses what would break a one-line answer (EC2 serves a
// tag as a text file): control characters and invalid UTF-8.
func printableValue(what, v string, max int) error {
	if len(v) > max {
		return errdefs.Invalid("%s is %d bytes; the limit is %d", what, len(v), max)
	}
	if !utf8.ValidString(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 {
		return errdefs.Invalid("%s must be UTF-8 text without control characters", what)
	}
	return nil
}

// normalizeTags returns tags sorted, without duplicates: tags are a set.
func normalizeTags(tags []string) []string {
	if len(tags) == 0 {
		return nil
	}
	out := slices.Clone(tags)
	sort.Strings(out)
	return slices.Compact(out)
}

// validateSSHKeys checks authorized_keys lines: each parses and holds one
// key, and there are at most maxSSHKeys of them.
func validateSSHKeys(field string, keys []string) error {
	if len(keys) > maxSSHKeys {
		return errdefs.Invalid("%d SSH keys given; at most %d are allowed", len(keys), maxSSHKeys)
	}
	for i, k := range keys {
		if len(k) > MaxSSHKeyBytes {
			return errdefs.Invalid("%s[%d] is %d bytes; an authorized_keys line holds at most %d (a 16384-bit RSA key with a long comment fits)", field, i, len(k), MaxSSHKeyBytes)
		}
		if _, _, _, rest, err := ssh.ParseAuthorizedKey([]byte(k)); err != nil {
			return errdefs.Invalid("%s[%d] is not an SSH public key in authorized_keys format (like the contents of ~/.ssh/id_ed25519.pub): %v", field, i, err)
		} else if len(strings.TrimSpace(string(rest))) > 0 {
			return errdefs.Invalid("%s[%d] holds more than one key; give each key as its own entry", field, i)
		}
	}
	return nil
}

// sshFingerprint is ssh-keygen -lf's SHA256 fingerprint of an
// authorized_keys line ("" if it does not parse).
func sshFingerprint(line string) string {
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return ""
	}
	return ssh.FingerprintSHA256(pub)
}

// checkPatch refuses a patch that contradicts itself.
func checkPatch(req *minicloudv1.UpdateVMMetadataRequest) error {
	for _, k := range req.GetRemoveLabels() {
		if _, ok := req.GetSetLabels()[k]; ok {
			return errdefs.Invalid("label %s is both set and removed", k)
		}
	}
	for _, k := range req.GetRemoveMetadata() {
		if _, ok := req.GetSetMetadata()[k]; ok {
			return errdefs.Invalid("metadata %s is both set and removed", k)
		}
	}
	for _, t := range req.GetRemoveTags() {
		if slices.Contains(req.GetAddTags(), t) {
			return errdefs.Invalid("tag %s is both added and removed", t)
		}
	}
	if err := validateSSHKeys("add_ssh_keys", req.GetAddSshKeys()); err != nil {
		return err
	}
	if req.GetResourceVersion() < 0 {
		return errdefs.Invalid("resource_version %d is negative", req.GetResourceVersion())
	}
	return nil
}

// applyPatch changes vm's labels, tags, metadata and SSH keys as req says
// and returns what changed, for the event log ("" when nothing did).
func applyPatch(vm *minicloudv1.VM, req *minicloudv1.UpdateVMMetadataRequest) string {
	var changes []string
	note := func(what string, items []string) {
		if len(items) > 0 {
			changes = append(changes, what+" "+strings.Join(items, ", "))
		}
	}
	meta, spec := vm.Meta, vm.Spec

	var set, removed []string
	for _, k := range slices.Sorted(maps.Keys(req.GetSetLabels())) {
		if v, ok := meta.Labels[k]; !ok || v != req.GetSetLabels()[k] {
			if meta.Labels == nil {
				meta.Labels = map[string]string{}
			}
			meta.Labels[k] = req.GetSetLabels()[k]
			set = append(set, k)
		}
	}
	for _, k := range req.GetRemoveLabels() {
		if _, ok := meta.Labels[k]; ok {
			delete(meta.Labels, k)
			removed = append(removed, k)
		}
	}
	note("labels set:", set)
	note("labels removed:", removed)

	set, removed = nil, nil
	for _, k := range slices.Sorted(maps.Keys(req.GetSetMetadata())) {
		v := req.GetSetMetadata()[k]
		if old, ok := spec.Metadata[k]; !ok || old != v {
			if spec.Metadata == nil {
				spec.Metadata = map[string]string{}
			}
			spec.Metadata[k] = v
			set = append(set, fmt.Sprintf("%s (%d bytes)", k, len(v)))
		}
	}
	for _, k := range req.GetRemoveMetadata() {
		if _, ok := spec.Metadata[k]; ok {
			delete(spec.Metadata, k)
			removed = append(removed, k)
		}
	}
	note("metadata set:", set)
	note("metadata removed:", removed)

	set, removed = nil, nil
	for _, t := range req.GetAddTags() {
		if !slices.Contains(spec.Tags, t) && !slices.Contains(set, t) {
			set = append(set, t)
		}
	}
	tags := append(slices.Clone(spec.Tags), set...)
	tags = slices.DeleteFunc(tags, func(t string) bool {
		if slices.Contains(req.GetRemoveTags(), t) {
			removed = append(removed, t)
			return true
		}
		return false
	})
	spec.Tags = normalizeTags(tags)
	note("tags added:", set)
	note("tags removed:", removed)

	set, removed = nil, nil
	have := map[string]bool{}
	for _, k := range spec.SshPublicKeys {
		have[sshFingerprint(k)] = true
	}
	for _, k := range req.GetAddSshKeys() {
		fp := sshFingerprint(k)
		if !have[fp] {
			have[fp] = true
			spec.SshPublicKeys = append(spec.SshPublicKeys, strings.TrimSpace(k))
			set = append(set, fp)
		}
	}
	spec.SshPublicKeys = slices.DeleteFunc(spec.SshPublicKeys, func(k string) bool {
		fp := sshFingerprint(k)
		for _, r := range req.GetRemoveSshKeys() {
			if r == fp || strings.TrimSpace(r) == k {
				removed = append(removed, fp)
				return true
			}
		}
		return false
	})
	note("SSH keys added:", set)
	note("SSH keys removed:", removed)
	return strings.Join(changes, "; ")
}

// UpdateVMMetadata applies a metadata patch under optimistic concurrency.
// The write changes the spec key, so the VM's host receives it on its
// assignment stream and serves it at once; lifecycle_version keeps the
// host from taking it for a start request.
func (v *vmService) UpdateVMMetadata(ctx context.Context, req *minicloudv1.UpdateVMMetadataRequest) (*minicloudv1.VM, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := nameOrIDRef(req.GetName()); err != nil {
		return nil, err
	}
	if err := checkPatch(req); err != nil {
		return nil, err
	}
	stale := func(have string) error {
		return errdefs.FailedPrecondition("vm %s changed: request has resource_version %d, %s; read it again (`minicloud vm show`) and retry", req.GetName(), req.GetResourceVersion(), have)
	}
	for range maxTxnAttempts {
		vm, err := v.s.lookupVM(ctx, project, req.GetName())
		if err != nil {
			return nil, err
		}
		from := vm.GetMeta().GetResourceVersion()
		if want := req.GetResourceVersion(); want != 0 && want != from {
			return nil, stale(fmt.Sprintf("current is %d", from))
		}
		if vm.GetSpec().GetDeletionRequested() {
			return nil, errdefs.FailedPrecondition("vm %s is being deleted", vm.GetMeta().GetName())
		}
		next := &minicloudv1.VM{Meta: proto.CloneOf(vm.GetMeta()), Spec: proto.CloneOf(vm.GetSpec())}
		if next.Spec == nil {
			next.Spec = &minicloudv1.VMSpec{}
		}
		changed := applyPatch(next, req)
		if changed == "" {
			// Nothing to do: no write, no new version for the host to act on.
			return vm, nil
		}
		if err := validateGuestMetadata(next.Meta.GetLabels(), next.Spec.GetTags(), next.Spec.GetMetadata()); err != nil {
			return nil, err
		}
		if err := validateSSHKeys("ssh_public_keys", next.Spec.GetSshPublicKeys()); err != nil {
			return nil, err
		}
		if next.Spec.LifecycleVersion == 0 {
			next.Spec.LifecycleVersion = from
		}
		txn, err := store.UpdateVMSpecTxn(next, time.Now(), &minicloudv1.Event{
			Type: lifecycle.EventNormal, Reason: lifecycle.ReasonMetadataUpdated, Source: "api", Message: changed,
		})
		if err != nil {
			return nil, err
		}
		rev, ok, err := txn.Commit(ctx, v.s.etcd)
		if err != nil {
			return nil, err
		}
		if ok {
			next.Meta.ResourceVersion = rev
			next.Status = vm.GetStatus()
			v.s.log.Info("vm metadata updated", "vm", vm.GetMeta().GetName(), "project", project, "id", vm.GetMeta().GetId(), "rev", rev, "changes", changed)
			return next, nil
		}
		// Lost a race: a pinned version that went stale fails the check
		// at the top on the next pass (another event append does not).
	}
	return nil, tooMuchContention("update metadata of vm " + req.GetName())
}
