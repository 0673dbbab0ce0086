package store

import (
	"context"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// The VM write protocols. Each builds the one etcd transaction of one step
// of a VM's life (lifecycle has the table of steps): its compares say what
// must not have changed since the caller read the VM, so a lost race is a
// failed compare, never a lost update. Callers re-read and decide again when
// Commit says !ok. A new protocol is one more function here.

// VMUnchanged holds while neither the spec nor the status of vm changed
// since vm was read.
func VMUnchanged(vm *minicloudv1.VM) []clientv3.Cmp {
	id := vm.GetMeta().GetId()
	return []clientv3.Cmp{
		Unchanged(VMSpecKey(id), vm.GetMeta().GetResourceVersion()),
		Unchanged(VMStatusKey(id), vm.GetStatus().GetStatusVersion()),
	}
}

// NewVM is a VM to create and what its create read.
type NewVM struct {
	// VM has meta, spec and the first status, with one address per network.
	VM       *minicloudv1.VM
	UserData []byte
	Event    *minicloudv1.Event
	// FlavorRev is the mod revision of the flavor the resources came from.
	FlavorRev int64
	// ImageRev, if set, is the mod revision of the image as read (its
	// visibility allowed the VM's project to boot from it); 0 only
	// requires that the image exists.
	ImageRev int64
	// Networks has, for each of VM.Status.Addresses, the network's id (its
	// IPAM range) and the mod revision of its key.
	Networks []NetworkRef
	// RequestID, if set, makes the create idempotent: vms/requests/ maps it
	// to the VM (RequestRev is that key's mod revision as read, 0: absent),
	// under Lease.
	RequestID  string
	RequestRev int64
	// RequestFingerprint identifies the request's parameters, stored with
	// the VM id so a reuse of the id for another request is told apart
	// (see RequestValue).
	RequestFingerprint string
	Lease              clientv3.LeaseID
	Now                time.Time
	// Records are puts that go with the create, its audit record
	// (AuditLog.Op): written only if the VM is.
	Records []clientv3.Op
}

// NetworkRef is a network a create read.
type NetworkRef struct {
	ID  string
	Rev int64
}

// CreateVMTxn writes spec, status, user-data, name index, request id,
// addresses and the first event under compares that keep the name and the
// addresses unique and the image, flavor, server group and networks in
// place.
func CreateVMTxn(n NewVM) (Txn, error) {
	var t Txn
	cmps, ops := createVMCost(n)
	t.If, t.Then = make([]clientv3.Cmp, 0, cmps), make([]clientv3.Op, 0, ops)
	if err := appendCreateVM(&t, n); err != nil {
		return Txn{}, err
	}
	return t, nil
}

// createVMCost is how many compares and writes appendCreateVM adds for n
// (at most), so a transaction is allocated once at its full size: a group
// commit of 32 creates grew and copied its lists VM by VM, ~60 MB of a
// 10 s benchmark (docs/benchmarks.md, "API").
func createVMCost(n NewVM) (cmps, ops int) {
	addrs := len(n.VM.GetStatus().GetAddresses())
	return 5 + 2*addrs, 5 + addrs + len(n.Records)
}

// MaxTxnOps is etcd's default --max-txn-ops: it refuses a transaction
// with more compares, or more writes, than this.
const MaxTxnOps = 128

// CreateVMSize is how many compares and writes creating n adds to a
// CreateVMsTxn (at most), its first event's included, so a group commit
// fills a transaction up to MaxTxnOps; CreateVMsTxn adds the usage key's
// (ChargeOps: 2 compares, 1 write) once.
func CreateVMSize(n NewVM) (cmps, ops int) {
	cmps, ops = createVMCost(n)
	if n.Event != nil {
		// The new event log's counter: compared absent, then written;
		// and the event.
		cmps, ops = cmps+1, ops+2
	}
	return cmps, ops
}

// appendCreateVM adds the compares, writes and first event of creating n
// (CreateVMTxn) to t.
func appendCreateVM(t *Txn, n NewVM) error {
	vm := n.VM
	id, project, name := vm.GetMeta().GetId(), vm.GetMeta().GetProject(), vm.GetMeta().GetName()
	t.If = appendCreateVMCompares(t.If, n)
	for i, a := range vm.GetStatus().GetAddresses() {
		t.Then = append(t.Then, clientv3.OpPut(IPAMKey(n.Networks[i].ID, a.GetIp()), id))
	}
	specOp, err := VMSpecOp(vm)
	if err != nil {
		return err
	}
	statusOp, err := VMStatusOp(id, vm.GetStatus())
	if err != nil {
		return err
	}
	t.Then = append(t.Then, specOp, statusOp, clientv3.OpPut(VMNameKey(project, name), id))
	if len(n.UserData) > 0 {
		t.Then = append(t.Then, clientv3.OpPut(VMUserDataKey(id), string(n.UserData)))
	}
	if n.RequestID != "" {
		t.Then = append(t.Then, clientv3.OpPut(VMRequestKey(project, n.RequestID), RequestValue(id, n.RequestFingerprint), clientv3.WithLease(n.Lease)))
	}
	t.Then = append(t.Then, n.Records...)
	if n.Event != nil {
		t.Events = append(t.Events, EventAppend{VMID: id, Now: n.Now, Events: []*minicloudv1.Event{n.Event}, New: true})
	}
	return nil
}

// appendCreateVMCompares adds the compares of creating n to cmps: the name,
// each address and the request id as read, the flavor, image, server
// group and networks in place. (The event log's compare is added at
// commit, by resolveEvents.)
func appendCreateVMCompares(cmps []clientv3.Cmp, n NewVM) []clientv3.Cmp {
	vm := n.VM
	project := vm.GetMeta().GetProject()
	spec := vm.GetSpec()
	cmps = append(cmps,
		Absent(VMNameKey(project, vm.GetMeta().GetName())),
		Unchanged(FlavorKey(spec.GetFlavor()), n.FlavorRev),
	)
	if n.ImageRev != 0 {
		cmps = append(cmps, Unchanged(ImageKey(spec.GetImage()), n.ImageRev))
	} else {
		cmps = append(cmps, Exists(ImageKey(spec.GetImage())))
	}
	if g := spec.GetServerGroup(); g != "" {
		cmps = append(cmps, Exists(ServerGroupKey(project, g)))
	}
	for i, a := range vm.GetStatus().GetAddresses() {
		nw := n.Networks[i]
		cmps = append(cmps, Unchanged(NetworkKey(project, a.GetNetwork()), nw.Rev), Absent(IPAMKey(nw.ID, a.GetIp())))
	}
	if n.RequestID != "" {
		cmps = append(cmps, Unchanged(VMRequestKey(project, n.RequestID), n.RequestRev))
	}
	return cmps
}

// CreateVMsTxn creates every VM of vms (each as CreateVMTxn does) and
// charges them to their project's quota, in one transaction: usage is the
// project's usage as read and next that usage plus every VM's VMUsage,
// allowed by Charge. The VMs must be of usage's project and must not write
// the same keys (names, request ids, addresses). If any compare fails,
// nothing is written.
func CreateVMsTxn(usage UsageState, next *minicloudv1.QuotaUsage, vms ...NewVM) (Txn, error) {
	nCmps, nOps := 2, 2 // the usage key's
	for _, n := range vms {
		c, o := createVMCost(n)
		nCmps, nOps = nCmps+c, nOps+o
	}
	t := Txn{If: make([]clientv3.Cmp, 0, nCmps), Then: make([]clientv3.Op, 0, nOps), Events: make([]EventAppend, 0, len(vms))}
	for _, n := range vms {
		if p := n.VM.GetMeta().GetProject(); p != usage.Project {
			return Txn{}, errdefs.Internal("vm %s of project %s charged to project %s", n.VM.GetMeta().GetName(), p, usage.Project)
		}
		if err := appendCreateVM(&t, n); err != nil {
			return Txn{}, err
		}
	}
	cmps, ops, err := ChargeOps(usage, next)
	if err != nil {
		return Txn{}, err
	}
	t.If, t.Then = append(t.If, cmps...), append(t.Then, ops...)
	return t, nil
}

// CreateVMsCheck is what CheckCreateVMs found.
type CreateVMsCheck struct {
	// Failed are the indexes, into the VMs checked, of the creates whose
	// own compares fail now.
	Failed []int
	// Usage is the project's usage and limits now (possibly uncounted:
	// see ReadCountedUsage).
	Usage UsageState
}

// CheckCreateVMs finds out, after a CreateVMsTxn of vms failed its
// compares, which of the VMs' own compares fail now and what the
// project's usage is, in one read-only round trip: each VM's compares go
// as a nested transaction that writes nothing, so etcd says of each
// whether they hold. A group commit then retries only the creates that
// lost a race and commits the rest, instead of sending the whole batch
// back to re-read.
func CheckCreateVMs(ctx context.Context, kv clientv3.KV, project string, vms ...NewVM) (CreateVMsCheck, error) {
	var reads Reads
	reads.Grow(len(vms) + 2)
	checks := make([]Read, len(vms))
	for i, n := range vms {
		cmps := appendCreateVMCompares(nil, n)
		if n.Event != nil {
			// The event log's compare, as resolveEvents adds it for a new
			// VM: a failure there is this VM's too.
			cmps = append(cmps, Absent(VMEventSeqKey(n.VM.GetMeta().GetId())))
		}
		checks[i] = reads.Add(clientv3.OpTxn(cmps, nil, nil))
	}
	u, l := UsageReads(&reads, project)
	if err := reads.Do(ctx, kv); err != nil {
		return CreateVMsCheck{}, fmt.Errorf("check the creates of project %s: %w", project, err)
	}
	var c CreateVMsCheck
	for i, r := range checks {
		if !r.Succeeded() {
			c.Failed = append(c.Failed, i)
		}
	}
	var err error
	c.Usage, err = DecodeUsage(project, u, l)
	return c, err
}

// UpdateVMSpecTxn stores vm's (changed) spec, compared with the resource
// version it was read at, and appends events.
func UpdateVMSpecTxn(vm *minicloudv1.VM, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	id := vm.GetMeta().GetId()
	specOp, err := VMSpecOp(vm)
	if err != nil {
		return Txn{}, err
	}
	t := Txn{
		If:   []clientv3.Cmp{Unchanged(VMSpecKey(id), vm.GetMeta().GetResourceVersion())},
		Then: []clientv3.Op{specOp},
	}
	t.AppendEvents(id, now, events...)
	return t, nil
}

// MarkVMDeletingTxn is the first step of a two-phase delete: next (vm with
// deletion requested and phase DELETING) replaces vm, read as it is.
func MarkVMDeletingTxn(vm, next *minicloudv1.VM, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	specOp, err := VMSpecOp(next)
	if err != nil {
		return Txn{}, err
	}
	statusOp, err := VMStatusOp(vm.GetMeta().GetId(), next.GetStatus())
	if err != nil {
		return Txn{}, err
	}
	t := Txn{If: VMUnchanged(vm), Then: []clientv3.Op{specOp, statusOp}}
	t.AppendEvents(vm.GetMeta().GetId(), now, events...)
	return t, nil
}

// UpdateVMStatusTxn replaces vm's status with next (a host's report merged
// into it) and appends events, if neither spec nor status changed since vm
// was read.
func UpdateVMStatusTxn(vm *minicloudv1.VM, next *minicloudv1.VMStatus, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	statusOp, err := VMStatusOp(vm.GetMeta().GetId(), next)
	if err != nil {
		return Txn{}, err
	}
	t := Txn{If: VMUnchanged(vm), Then: []clientv3.Op{statusOp}}
	t.AppendEvents(vm.GetMeta().GetId(), now, events...)
	return t, nil
}

// RescheduleVMTxn gives a VM back to the scheduler: next (PENDING, no host)
// replaces vm's status and the capacity claim on vm's host is released, in
// one transaction.
func RescheduleVMTxn(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM, next *minicloudv1.VMStatus, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	t, err := UpdateVMStatusTxn(vm, next, now, events...)
	if err != nil {
		return Txn{}, err
	}
	claim, err := ReadClaimState(ctx, kv, vm.GetStatus().GetHost(), vm.GetMeta().GetId())
	if err != nil {
		return Txn{}, err
	}
	cmps, ops, err := ReleaseClaimOps(claim)
	if err != nil {
		return Txn{}, err
	}
	t.If, t.Then = append(t.If, cmps...), append(ops, t.Then...)
	return t, nil
}

// RemoveVMTxn removes a VM for good: its keys (spec, status, user-data,
// name index, events), its addresses, its host port claims and the
// capacity claim on its host,
// and gives its share of the project's quota back. It reads the addresses,
// the claim and the usage first; the transaction compares what it read, so
// the share goes back exactly once: with the one removal that commits.
func RemoveVMTxn(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM) (Txn, error) {
	t := Txn{If: VMUnchanged(vm), Then: VMKeysOps(vm)}
	usage, err := ReadUsage(ctx, kv, vm.GetMeta().GetProject())
	if err != nil {
		return Txn{}, err
	}
	quotaCmps, quotaOps, err := ReleaseOps(usage, VMUsage(vm))
	if err != nil {
		return Txn{}, err
	}
	t.If, t.Then = append(t.If, quotaCmps...), append(t.Then, quotaOps...)
	if usage.Counted() {
		after := usage.Released(VMUsage(vm))
		t.Usage = &after
	}
	addrCmps, addrOps, err := releaseAddressOps(ctx, kv, vm)
	if err != nil {
		return Txn{}, err
	}
	t.If, t.Then = append(t.If, addrCmps...), append(t.Then, addrOps...)
	fwdCmps, fwdOps, err := releasePortForwardOps(ctx, kv, vm)
	if err != nil {
		return Txn{}, err
	}
	t.If, t.Then = append(t.If, fwdCmps...), append(t.Then, fwdOps...)
	if host := vm.GetStatus().GetHost(); host != "" {
		claim, err := ReadClaimState(ctx, kv, host, vm.GetMeta().GetId())
		if err != nil {
			return Txn{}, err
		}
		cmps, ops, err := ReleaseClaimOps(claim)
		if err != nil {
			return Txn{}, err
		}
		t.If, t.Then = append(t.If, cmps...), append(t.Then, ops...)
	}
	return t, nil
}

// releaseAddressOps frees the VM's addresses: every IPAM key that still
// names this VM is deleted, under a compare that it did not change. A key
// that is gone or names another VM is left alone, so a damaged IPAM range
// never makes a VM undeletable.
func releaseAddressOps(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM) ([]clientv3.Cmp, []clientv3.Op, error) {
	addrs := vm.GetStatus().GetAddresses()
	if len(addrs) == 0 {
		return nil, nil, nil
	}
	var networks Reads
	nets := make([]Read, len(addrs))
	for i, a := range addrs {
		nets[i] = networks.Get(NetworkKey(vm.GetMeta().GetProject(), a.GetNetwork()))
	}
	if err := networks.Do(ctx, kv); err != nil {
		return nil, nil, err
	}
	var ipam Reads
	for i, a := range addrs {
		kv := nets[i].First()
		if kv == nil {
			continue // the network is gone, and its addresses with it
		}
		nw := &minicloudv1.Network{}
		if err := Decode(kv, nw); err != nil {
			return nil, nil, err
		}
		ipam.Get(IPAMKey(nw.GetMeta().GetId(), a.GetIp()))
	}
	if len(ipam.ops) == 0 {
		return nil, nil, nil
	}
	if err := ipam.Do(ctx, kv); err != nil {
		return nil, nil, err
	}
	var (
		cmps []clientv3.Cmp
		ops  []clientv3.Op
	)
	for _, r := range ipam.resp.Responses {
		for _, kv := range r.GetResponseRange().GetKvs() {
			if string(kv.Value) == vm.GetMeta().GetId() {
				cmps = append(cmps, Unchanged(string(kv.Key), kv.ModRevision))
				ops = append(ops, clientv3.OpDelete(string(kv.Key)))
			}
		}
	}
	return cmps, ops, nil
}

// RequestValue is what vms/requests/<project>/<request-id> holds: the VM
// id and the fingerprint of the request that made it.
func RequestValue(vmID, fingerprint string) string {
	if fingerprint == "" {
		return vmID
	}
	return vmID + " " + fingerprint
}

// ParseRequestValue splits a RequestValue (a value of before fingerprints
// has none).
func ParseRequestValue(v string) (vmID, fingerprint string) {
	vmID, fingerprint, _ = strings.Cut(v, " ")
	return vmID, fingerprint
}
