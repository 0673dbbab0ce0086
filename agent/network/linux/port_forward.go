package linux

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Port forwards are elements of one map (port_fwd), looked up by two static
// rules (fwd_prerouting, fwd_output; ruleset.go), so adding a forward is a
// one-element transaction and the rule list never grows. Each element's
// comment names the VM, which is how ListPortForwards reports the owner
// and how an agent tells its forwards from another minicloud's on the
// same machine.

// Map key and value layouts: concatenated fields padded to 4-byte registers.
func keyPortFwd(protocol string, hostPort uint16) []byte {
	proto := byte(unix.IPPROTO_TCP)
	if protocol == "udp" {
		proto = unix.IPPROTO_UDP
	}
	return binary.BigEndian.AppendUint16([]byte{proto, 0, 0, 0}, hostPort)[:6:6]
}

func padded(b []byte) []byte { return append(b, 0, 0) }

func valPortFwd(ip netip.Addr, port uint16) []byte {
	return padded(binary.BigEndian.AppendUint16(ip.AsSlice(), port))
}

func parsePortFwd(e nftables.SetElement) (network.PortForward, bool) {
	if len(e.Key) < 6 || len(e.Val) < 6 {
		return network.PortForward{}, false
	}
	f := network.PortForward{VMID: e.Comment, HostPort: binary.BigEndian.Uint16(e.Key[4:6]), GuestPort: binary.BigEndian.Uint16(e.Val[4:6])}
	switch e.Key[0] {
	case unix.IPPROTO_TCP:
		f.Protocol = "tcp"
	case unix.IPPROTO_UDP:
		f.Protocol = "udp"
	default:
		return f, false
	}
	f.GuestIP, _ = netip.AddrFromSlice(e.Val[:4])
	return f, true
}

// EnsurePortForward implements network.Manager.
func (m *Manager) EnsurePortForward(ctx context.Context, f network.PortForward) error {
	if err := f.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ensureForwarding(); err != nil {
		return err
	}
	return m.apply(fmt.Sprintf("forward host port %d/%s", f.HostPort, f.Protocol), false, func(b *batch) error {
		key := padded(keyPortFwd(f.Protocol, f.HostPort))
		els, err := b.elements(inetTable, setPortFwd)
		if err != nil {
			return err
		}
		want := valPortFwd(f.GuestIP, f.GuestPort)
		s := b.set(inetTable, setPortFwd)
		for _, e := range els {
			if !bytes.Equal(e.Key, key) {
				continue
			}
			if e.Comment != f.VMID {
				return errdefs.AlreadyExists("host port %d/%s is forwarded to VM %s on this host", f.HostPort, f.Protocol, e.Comment)
			}
			if bytes.Equal(e.Val, want) {
				return nil
			}
			// Another target of the same VM: delete and add in one
			// transaction, so the port never forwards nowhere.
			b.changes++
			if err := b.conn.SetDeleteElements(s, []nftables.SetElement{{Key: key}}); err != nil {
				return fmt.Errorf("delete from set %s: %w", setPortFwd, err)
			}
		}
		b.changes++
		if err := b.conn.SetAddElements(s, []nftables.SetElement{{Key: key, Val: want, Comment: f.VMID}}); err != nil {
			return fmt.Errorf("add to set %s: %w", setPortFwd, err)
		}
		return nil
	})
}

// DeletePortForward implements network.Manager.
func (m *Manager) DeletePortForward(ctx context.Context, protocol string, hostPort uint16) error {
	if err := network.ValidateProtocol(protocol); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.apply(fmt.Sprintf("remove forward of host port %d/%s", hostPort, protocol), false, func(b *batch) error {
		return b.replaceKeys(inetTable, setPortFwd, padded(keyPortFwd(protocol, hostPort)), nil)
	})
}

// ListPortForwards implements network.Manager.
func (m *Manager) ListPortForwards(ctx context.Context) ([]network.PortForward, error) {
	b, err := newBatch(nil)
	if err != nil {
		return nil, err
	}
	els, err := b.elements(inetTable, setPortFwd)
	if err != nil {
		return nil, err
	}
	out := make([]network.PortForward, 0, len(els))
	for _, e := range els {
		if f, ok := parsePortFwd(e); ok {
			out = append(out, f)
		}
	}
	slices.SortFunc(out, func(a, b network.PortForward) int {
		if a.Protocol != b.Protocol {
			return bytes.Compare([]byte(a.Protocol), []byte(b.Protocol))
		}
		return int(a.HostPort) - int(b.HostPort)
	})
	return out, nil
}
