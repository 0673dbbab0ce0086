package store

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Port forwards (docs/networking.md, "Port forwards"). A VM's forwards live
// in its spec, so they travel to its host with the assignment stream and
// follow it when it moves (evacuation rebuilds it elsewhere with the same
// spec). The host port of each forward is claimed in portforwards/<proto>/
// <port>, which names the VM: claimed for the whole cluster, not per host,
// because a VM may be rebuilt on any host, and a claim per host would have
// to be taken again (and could be refused) in the middle of an evacuation.
// The claim is written in the same transaction as the spec, and released
// with the forward or with the VM (RemoveVMTxn).

// PortRange bounds the host ports forwards may use.
type PortRange struct {
	First, Last int32
}

// DefaultPortForwardRange stays below Linux's ephemeral port range
// (32768-60999), where services on the host listen on random ports, and
// above the well-known and most registered service ports.
var DefaultPortForwardRange = PortRange{First: 20000, Last: 32767}

// ReservedHostPorts are ports of minicloud itself and of what it runs on
// a host: never forwarded, whatever the range says.
var ReservedHostPorts = map[int32]string{
	22:   "the host's SSH",
	53:   "the guest DNS service",
	67:   "the guest DHCP service",
	80:   "the metadata service",
	2379: "etcd (clients)",
	2380: "etcd (peers)",
	4789: "VXLAN (the tunnels between hosts)",
	8640: "the minicloud API",
	8641: "the API's metrics",
	8642: "the agent",
	8643: "the agent's metrics",
	8644: "the API's web listener (HTTP/JSON API, web UI)",
	8645: "the scheduler's metrics",
}

// MaxPortForwardsPerVM bounds the forwards of one VM.
const MaxPortForwardsPerVM = 16

// ParsePortRange reads "FIRST-LAST".
func ParsePortRange(s string) (PortRange, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.ParseInt(strings.TrimSpace(a), 10, 32)
	last, err2 := strconv.ParseInt(strings.TrimSpace(b), 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return PortRange{}, errdefs.Invalid("port range %q: want FIRST-LAST, e.g. 20000-32767", s)
	}
	r := PortRange{First: int32(first), Last: int32(last)}
	return r, r.Validate()
}

// Validate checks the range. Ports below 1024 are allowed only when the
// operator's range names them.
func (r PortRange) Validate() error {
	if r.First < 1 || r.Last > 65535 || r.First > r.Last {
		return errdefs.Invalid("port range %d-%d: want 1 <= first <= last <= 65535", r.First, r.Last)
	}
	return nil
}

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// CheckHostPort refuses a host port outside r or reserved.
func (r PortRange) CheckHostPort(p int32) error {
	if why, ok := ReservedHostPorts[p]; ok {
		return errdefs.Invalid("host port %d is %s on every host: pick one in %s", p, why, r)
	}
	if p < r.First || p > r.Last {
		return errdefs.Invalid("host port %d is outside the range forwards may use, %s (minicloudd api --port-forward-range)", p, r)
	}
	return nil
}

// ProtocolName is "tcp" or "udp" (UNSPECIFIED is TCP).
func ProtocolName(p minicloudv1.PortProtocol) string {
	if p == minicloudv1.PortProtocol_PORT_PROTOCOL_UDP {
		return "udp"
	}
	return "tcp"
}

// PortForwardKey is the claim of a host port.
func PortForwardKey(p minicloudv1.PortProtocol, hostPort int32) string {
	return fmt.Sprintf("%s%s/%d", PortForwardPrefix, ProtocolName(p), hostPort)
}

// FindPortForward returns the index of the VM's forward of host port p, or -1.
func FindPortForward(fwds []*minicloudv1.PortForward, p minicloudv1.PortProtocol, hostPort int32) int {
	return slices.IndexFunc(fwds, func(f *minicloudv1.PortForward) bool {
		return ProtocolName(f.GetProtocol()) == ProtocolName(p) && f.GetHostPort() == hostPort
	})
}

// PortForwardHolder reads which VM holds a host port ("" when free).
func PortForwardHolder(ctx context.Context, kv clientv3.KV, p minicloudv1.PortProtocol, hostPort int32) (vmID string, modRev int64, err error) {
	resp, err := kv.Get(ctx, PortForwardKey(p, hostPort))
	if err != nil {
		return "", 0, errdefs.Wrap(errdefs.KindUnavailable, err, "read port forward claim")
	}
	if len(resp.Kvs) == 0 {
		return "", 0, nil
	}
	return string(resp.Kvs[0].Value), resp.Kvs[0].ModRevision, nil
}

// ExposePortTxn stores next (vm with fwd added to its spec) and claims
// fwd's host port for the VM, if the port is still free and the spec
// unchanged since vm was read.
func ExposePortTxn(next *minicloudv1.VM, fwd *minicloudv1.PortForward, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	t, err := UpdateVMSpecTxn(next, now, events...)
	if err != nil {
		return Txn{}, err
	}
	key := PortForwardKey(fwd.GetProtocol(), fwd.GetHostPort())
	t.If = append(t.If, Absent(key))
	t.Then = append(t.Then, clientv3.OpPut(key, next.GetMeta().GetId()))
	return t, nil
}

// UnexposePortTxn stores next (vm without the forward of host port p) and
// releases the claim if it names the VM (holderRev is its mod revision as
// read; 0: it did not name the VM, and is left alone).
func UnexposePortTxn(next *minicloudv1.VM, p minicloudv1.PortProtocol, hostPort int32, holderRev int64, now time.Time, events ...*minicloudv1.Event) (Txn, error) {
	t, err := UpdateVMSpecTxn(next, now, events...)
	if err != nil {
		return Txn{}, err
	}
	if holderRev != 0 {
		key := PortForwardKey(p, hostPort)
		t.If = append(t.If, Unchanged(key, holderRev))
		t.Then = append(t.Then, clientv3.OpDelete(key))
	}
	return t, nil
}

// releasePortForwardOps frees the host ports of vm's forwards: every claim
// that still names the VM is deleted, under a compare that it did not
// change. A claim that is gone or names another VM is left alone, so a
// damaged claim never makes a VM undeletable.
func releasePortForwardOps(ctx context.Context, kv clientv3.KV, vm *minicloudv1.VM) ([]clientv3.Cmp, []clientv3.Op, error) {
	fwds := vm.GetSpec().GetPortForwards()
	if len(fwds) == 0 {
		return nil, nil, nil
	}
	var reads Reads
	handles := make([]Read, len(fwds))
	for i, f := range fwds {
		handles[i] = reads.Get(PortForwardKey(f.GetProtocol(), f.GetHostPort()))
	}
	if err := reads.Do(ctx, kv); err != nil {
		return nil, nil, fmt.Errorf("read port forward claims of vm %s: %w", vm.GetMeta().GetName(), err)
	}
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for _, h := range handles {
		kv := h.First()
		if kv == nil || string(kv.Value) != vm.GetMeta().GetId() {
			continue
		}
		cmps = append(cmps, Unchanged(string(kv.Key), kv.ModRevision))
		ops = append(ops, clientv3.OpDelete(string(kv.Key)))
	}
	return cmps, ops, nil
}
