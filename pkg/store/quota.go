package store

import (
	"context"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Quotas.
//
// quotas/usage/<project> is what the project holds (QuotaUsage) and
// quotas/limits/<project> its overrides of the API server's default limits
// (QuotaLimits). Every write that adds or removes something a quota counts
// (a VM, a network, a server group, an image) changes the usage key in the
// same transaction, under a compare of the usage key's mod revision as
// read (and, when it adds, of the limits key's): two creates that both saw
// room for one cannot both commit, and a removal gives its share back
// exactly once because the removal itself can commit only once. It is the
// host allocation protocol of claims.go applied to projects.
//
// A project with objects from before quotas has no usage key. Its first
// charge counts its objects (CountUsage) and writes the record; the
// compare that the usage key is still as read (absent, or an uncounted
// marker that removals rewrite) makes any create or removal in between
// fail that charge, so the count is exact.

// Unlimited is the limit that never refuses.
const Unlimited = -1

// UsageState is a project's usage and overrides, read at one revision.
type UsageState struct {
	Project string
	// Usage is nil when the project's usage has not been counted (no key,
	// or an uncounted marker): CountUsage fills it.
	Usage    *minicloudv1.QuotaUsage
	UsageRev int64 // mod revision of quotas/usage/<project>; 0: absent
	// Overrides is never nil (empty: every limit is the default).
	Overrides *minicloudv1.QuotaLimits
	LimitsRev int64 // mod revision of quotas/limits/<project>; 0: absent
	// written, if set, is the usage key's value as a charge not yet
	// committed writes it (see Charged): a charge built on s compares the
	// key's value with it instead of its mod revision.
	written string
}

// Charged is s after a commit of ChargeOps(s, next) that has not returned
// yet, so that a group commit can build its next charge while the
// previous one is in flight (api/server/createbatch.go): the revision that
// commit will get is not known yet, but the value it writes is, so a
// charge built on the result compares the usage key's value. It commits
// only if the usage key holds exactly that value: if the previous charge
// failed, or anything else wrote the key since, it fails too. Comparing a
// counted usage's value rather than its revision is as safe: the record
// is a sum, so a charge that finds the sum it computed from adds to the
// true sum, whatever writes came and went before (an "ABA" is harmless).
// An uncounted marker is never compared by value (removals rewrite the
// same marker), and a charge always writes a counted usage.
func (s UsageState) Charged(next *minicloudv1.QuotaUsage) (UsageState, error) {
	v, err := Marshal(next)
	if err != nil {
		return UsageState{}, err
	}
	s.Usage, s.UsageRev, s.written = next, 0, v
	return s, nil
}

// Counted says whether s.Usage is known.
func (s UsageState) Counted() bool { return s.Usage != nil }

// UsageReads adds the gets of project's usage and limits keys to reads;
// DecodeUsage turns them into a UsageState.
func UsageReads(reads *Reads, project string) (usage, limits Read) {
	return reads.Get(QuotaUsageKey(project)), reads.Get(QuotaLimitsKey(project))
}

// DecodeUsage decodes what UsageReads read.
func DecodeUsage(project string, usage, limits Read) (UsageState, error) {
	s := UsageState{Project: project, Overrides: &minicloudv1.QuotaLimits{}}
	if kv := usage.First(); kv != nil {
		u := &minicloudv1.QuotaUsage{}
		if err := Decode(kv, u); err != nil {
			return s, err
		}
		s.UsageRev = kv.ModRevision
		if !u.GetUncounted() {
			s.Usage = u
		}
	}
	if kv := limits.First(); kv != nil {
		if err := Decode(kv, s.Overrides); err != nil {
			return s, err
		}
		s.LimitsRev = kv.ModRevision
	}
	return s, nil
}

// ReadUsage reads project's usage and overrides in one round trip. The
// usage may be uncounted (see CountUsage).
func ReadUsage(ctx context.Context, kv clientv3.KV, project string) (UsageState, error) {
	var reads Reads
	u, l := UsageReads(&reads, project)
	if err := reads.Do(ctx, kv); err != nil {
		return UsageState{}, fmt.Errorf("read quota of project %s: %w", project, err)
	}
	return DecodeUsage(project, u, l)
}

// ReadCountedUsage is ReadUsage, counting the project's objects if its
// usage was never counted.
func ReadCountedUsage(ctx context.Context, kv clientv3.KV, project string) (UsageState, error) {
	s, err := ReadUsage(ctx, kv, project)
	if err != nil || s.Counted() {
		return s, err
	}
	return s, CountUsage(ctx, kv, &s)
}

// CountUsage counts what s's project holds (VMs, networks, server groups,
// images it owns) into s.Usage. It must run after s was read: a charge
// built on s compares the usage key as s read it, and every write that
// changes a project's holdings since then changed that key.
func CountUsage(ctx context.Context, kv clientv3.KV, s *UsageState) error {
	var reads Reads
	vms := reads.Get(VMSpecPrefix, clientv3.WithPrefix())
	nets := reads.Get(NetworkKey(s.Project, ""), clientv3.WithPrefix(), clientv3.WithCountOnly())
	sgs := reads.Get(ServerGroupKey(s.Project, ""), clientv3.WithPrefix(), clientv3.WithCountOnly())
	imgs := reads.Get(ImagePrefix, clientv3.WithPrefix())
	if err := reads.Do(ctx, kv); err != nil {
		return fmt.Errorf("count what project %s holds: %w", s.Project, err)
	}
	u := &minicloudv1.QuotaUsage{Networks: nets.Count(), ServerGroups: sgs.Count()}
	for _, kv := range vms.KVs() {
		vm, err := DecodeVM(kv, nil)
		if err != nil {
			return err
		}
		if vm.GetMeta().GetProject() == s.Project {
			u = AddUsage(u, VMUsage(vm), 1)
		}
	}
	for _, kv := range imgs.KVs() {
		img := &minicloudv1.Image{}
		if err := Decode(kv, img); err != nil {
			return err
		}
		if img.GetMeta().GetProject() == s.Project {
			u.ImageBytes += ImageBytes(img)
		}
	}
	s.Usage = u
	return nil
}

// VMUsage is what one VM counts: an instance and its flavor's resources
// as recorded in its spec at create (so its removal gives back exactly
// what its create took, whatever happened to the flavor since).
func VMUsage(vm *minicloudv1.VM) *minicloudv1.QuotaUsage {
	r := vm.GetSpec().GetResources()
	return &minicloudv1.QuotaUsage{Instances: 1, Vcpus: int64(r.GetVcpus()), MemoryMib: r.GetMemoryMib(), DiskGib: r.GetDiskGib()}
}

// ImageBytes is what an image counts: the size of every part as uploaded
// (parts shared with other images by content are counted in each).
func ImageBytes(img *minicloudv1.Image) int64 {
	return img.GetDisk().GetSizeBytes() + img.GetKernel().GetSizeBytes() + img.GetInitrd().GetSizeBytes()
}

// AddUsage returns u + sign*d, never below zero (a negative count would
// only hide an inconsistency behind free room).
func AddUsage(u, d *minicloudv1.QuotaUsage, sign int64) *minicloudv1.QuotaUsage {
	add := func(a, b int64) int64 { return max(0, a+sign*b) }
	return &minicloudv1.QuotaUsage{
		Instances:    add(u.GetInstances(), d.GetInstances()),
		Vcpus:        add(u.GetVcpus(), d.GetVcpus()),
		MemoryMib:    add(u.GetMemoryMib(), d.GetMemoryMib()),
		DiskGib:      add(u.GetDiskGib(), d.GetDiskGib()),
		Networks:     add(u.GetNetworks(), d.GetNetworks()),
		ServerGroups: add(u.GetServerGroups(), d.GetServerGroups()),
		ImageBytes:   add(u.GetImageBytes(), d.GetImageBytes()),
	}
}

// EffectiveLimits is overrides over defaults; a limit neither sets is
// unlimited. Every field of the result is set.
func EffectiveLimits(defaults, overrides *minicloudv1.QuotaLimits) *minicloudv1.QuotaLimits {
	out := &minicloudv1.QuotaLimits{}
	for _, d := range quotaDims {
		v := int64(Unlimited)
		if dv := d.limit(defaults); dv != nil {
			v = *dv
		}
		if ov := d.limit(overrides); ov != nil {
			v = *ov
		}
		d.setLimit(out, v)
	}
	return out
}

// MergeOverrides returns cur with every field set in change replaced.
func MergeOverrides(cur, change *minicloudv1.QuotaLimits) *minicloudv1.QuotaLimits {
	out := proto.CloneOf(cur)
	if out == nil {
		out = &minicloudv1.QuotaLimits{}
	}
	proto.Merge(out, change)
	return out
}

// ValidateLimits refuses limits below -1.
func ValidateLimits(l *minicloudv1.QuotaLimits) error {
	for _, d := range quotaDims {
		if v := d.limit(l); v != nil && *v < Unlimited {
			return errdefs.Invalid("quota %s %d: a limit is a count >= 0, or -1 for unlimited", d.name, *v)
		}
	}
	return nil
}

// Charge returns used + delta, or ResourceExhausted naming every limit
// delta would exceed: what was asked, what is used and what is allowed.
// Only dimensions delta increases are checked, so a project over a
// lowered limit can still do what does not add to it.
func Charge(project string, used, delta *minicloudv1.QuotaUsage, limits *minicloudv1.QuotaLimits) (*minicloudv1.QuotaUsage, error) {
	var over []string
	for _, d := range quotaDims {
		ask, have := d.used(delta), d.used(used)
		limit := d.limit(limits)
		if ask <= 0 || limit == nil || *limit == Unlimited {
			continue
		}
		if have+ask > *limit {
			over = append(over, fmt.Sprintf("%s: asked %d, used %d, allowed %d", d.name, ask, have, *limit))
		}
	}
	if len(over) > 0 {
		return nil, errdefs.ResourceExhausted("quota exceeded in project %s: %s (see `minicloud quota show %s`)", project, strings.Join(over, "; "), project)
	}
	return AddUsage(used, delta, 1), nil
}

// ChargeOps returns the compares and the write that change s's usage to
// next (s.Usage plus what Charge allowed): the usage key and the limits
// key are as s read them. Fold them into the transaction that creates what
// was charged for.
func ChargeOps(s UsageState, next *minicloudv1.QuotaUsage) ([]clientv3.Cmp, []clientv3.Op, error) {
	op, err := PutOp(QuotaUsageKey(s.Project), next)
	if err != nil {
		return nil, nil, err
	}
	usage := Unchanged(QuotaUsageKey(s.Project), s.UsageRev)
	if s.written != "" {
		usage = clientv3.Compare(clientv3.Value(QuotaUsageKey(s.Project)), "=", s.written)
	}
	return []clientv3.Cmp{usage, Unchanged(QuotaLimitsKey(s.Project), s.LimitsRev)}, []clientv3.Op{op}, nil
}

// ReleaseOps returns the compares and the write that give delta back to
// s's project: the usage key is as s read it. A project whose usage was
// never counted gets an uncounted marker instead, rewritten at every
// removal, so that a count running concurrently fails its compare rather
// than count what is being removed.
func ReleaseOps(s UsageState, delta *minicloudv1.QuotaUsage) ([]clientv3.Cmp, []clientv3.Op, error) {
	next := &minicloudv1.QuotaUsage{Uncounted: true}
	if s.Counted() {
		next = s.Released(delta).Usage
	}
	op, err := PutOp(QuotaUsageKey(s.Project), next)
	if err != nil {
		return nil, nil, err
	}
	return []clientv3.Cmp{Unchanged(QuotaUsageKey(s.Project), s.UsageRev)}, []clientv3.Op{op}, nil
}

// Released is a counted s as ReleaseOps(s, delta) writes it, its UsageRev
// 0 (the commit's revision, not known before it).
func (s UsageState) Released(delta *minicloudv1.QuotaUsage) UsageState {
	s.Usage, s.UsageRev, s.written = AddUsage(s.Usage, delta, -1), 0, ""
	return s
}

// ReadReleaseOps reads project's usage and returns ReleaseOps of delta.
func ReadReleaseOps(ctx context.Context, kv clientv3.KV, project string, delta *minicloudv1.QuotaUsage) ([]clientv3.Cmp, []clientv3.Op, error) {
	s, err := ReadUsage(ctx, kv, project)
	if err != nil {
		return nil, nil, err
	}
	return ReleaseOps(s, delta)
}

// quotaDim is one dimension of a quota, for the code that treats them all
// alike.
type quotaDim struct {
	name     string
	used     func(*minicloudv1.QuotaUsage) int64
	limit    func(*minicloudv1.QuotaLimits) *int64
	setLimit func(*minicloudv1.QuotaLimits, int64)
}

func limitOf(f func(*minicloudv1.QuotaLimits) **int64) func(*minicloudv1.QuotaLimits) *int64 {
	return func(l *minicloudv1.QuotaLimits) *int64 {
		if l == nil {
			return nil
		}
		return *f(l)
	}
}

func setterOf(f func(*minicloudv1.QuotaLimits) **int64) func(*minicloudv1.QuotaLimits, int64) {
	return func(l *minicloudv1.QuotaLimits, v int64) { *f(l) = &v }
}

func dim(name string, used func(*minicloudv1.QuotaUsage) int64, field func(*minicloudv1.QuotaLimits) **int64) quotaDim {
	return quotaDim{name: name, used: used, limit: limitOf(field), setLimit: setterOf(field)}
}

// quotaDims names the dimensions as the CLI's flags and the docs do.
var quotaDims = []quotaDim{
	dim("instances", (*minicloudv1.QuotaUsage).GetInstances, func(l *minicloudv1.QuotaLimits) **int64 { return &l.Instances }),
	dim("vcpus", (*minicloudv1.QuotaUsage).GetVcpus, func(l *minicloudv1.QuotaLimits) **int64 { return &l.Vcpus }),
	dim("memory_mib", (*minicloudv1.QuotaUsage).GetMemoryMib, func(l *minicloudv1.QuotaLimits) **int64 { return &l.MemoryMib }),
	dim("disk_gib", (*minicloudv1.QuotaUsage).GetDiskGib, func(l *minicloudv1.QuotaLimits) **int64 { return &l.DiskGib }),
	dim("networks", (*minicloudv1.QuotaUsage).GetNetworks, func(l *minicloudv1.QuotaLimits) **int64 { return &l.Networks }),
	dim("server_groups", (*minicloudv1.QuotaUsage).GetServerGroups, func(l *minicloudv1.QuotaLimits) **int64 { return &l.ServerGroups }),
	dim("image_bytes", (*minicloudv1.QuotaUsage).GetImageBytes, func(l *minicloudv1.QuotaLimits) **int64 { return &l.ImageBytes }),
}
