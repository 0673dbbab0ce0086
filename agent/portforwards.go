package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/minicloud/minicloud/agent/network"
	"github.com/minicloud/minicloud/pkg/store"
)

// Port forwards (minicloud vm expose) are part of a VM's spec, so this
// host learns them with its assignments. syncForwards converges the host's
// DNAT map to exactly the forwards of the VMs assigned here, level-
// triggered: after every assignment change and on every resync, so a
// forward follows a VM that moved away (evacuation) or was deleted, and a
// restarted agent removes what changed while it was down.
//
// Only forwards of this agent's VMs are ever removed: those of VMs assigned
// to it or whose files it holds (observedVMIDs). Another minicloud on the
// same machine (a test cloud beside `make up`) keeps its own.

// wantedForwards are the forwards of every assigned VM that is not being
// deleted and has an address, by protocol and host port.
func (a *Agent) wantedForwards() (want map[string]network.PortForward, ours map[string]bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	want, ours = map[string]network.PortForward{}, map[string]bool{}
	for id, as := range a.assigned {
		ours[id] = true
		vm := as.vm
		addrs := vm.GetStatus().GetAddresses()
		if vm.GetSpec().GetDeletionRequested() || len(addrs) == 0 {
			continue
		}
		ip, err := netip.ParseAddr(addrs[0].GetIp())
		if err != nil {
			continue
		}
		for _, f := range vm.GetSpec().GetPortForwards() {
			pf := network.PortForward{
				VMID: id, Protocol: store.ProtocolName(f.GetProtocol()),
				HostPort: uint16(f.GetHostPort()), GuestIP: ip, GuestPort: uint16(f.GetGuestPort()),
			}
			want[forwardKey(pf)] = pf
		}
	}
	return want, ours
}

func forwardKey(f network.PortForward) string { return fmt.Sprintf("%s/%d", f.Protocol, f.HostPort) }

// syncForwards converges the host's forwards; it does nothing before the
// first full assignment set (a partial view must not remove anything).
func (a *Agent) syncForwards(ctx context.Context) error {
	a.fwdMu.Lock()
	defer a.fwdMu.Unlock()
	a.mu.Lock()
	synced := a.synced
	a.mu.Unlock()
	if !synced {
		return nil
	}
	want, ours := a.wantedForwards()
	for _, id := range a.observedVMIDs() {
		ours[id] = true
	}
	have, err := a.net.ListPortForwards(ctx)
	if err != nil {
		return fmt.Errorf("list port forwards: %w", err)
	}
	var errs []error
	for _, f := range have {
		w, wanted := want[forwardKey(f)]
		if wanted && w == f || !ours[f.VMID] {
			continue
		}
		if wanted && w.VMID == f.VMID {
			continue // a new target of the same VM: EnsurePortForward replaces it atomically
		}
		if err := a.net.DeletePortForward(ctx, f.Protocol, f.HostPort); err != nil {
			errs = append(errs, fmt.Errorf("remove forward %s of vm %s: %w", forwardKey(f), f.VMID, err))
			continue
		}
		a.log.Info("port forward removed", "vm", f.VMID, "host_port", forwardKey(f), "guest", netip.AddrPortFrom(f.GuestIP, f.GuestPort))
	}
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		f := want[k]
		if slices.Contains(have, f) {
			continue
		}
		if err := a.net.EnsurePortForward(ctx, f); err != nil {
			// ALREADY_EXISTS: something else on this machine (another
			// minicloud) forwards the port; the API keeps host ports
			// unique within one cloud.
			errs = append(errs, fmt.Errorf("forward %s to vm %s: %w", k, f.VMID, err))
			continue
		}
		a.log.Info("port forward programmed", "vm", f.VMID, "host_port", k, "guest", netip.AddrPortFrom(f.GuestIP, f.GuestPort))
	}
	return errors.Join(errs...)
}

// syncForwardsLogged is syncForwards for callers that cannot retry: the
// next assignment change or resync tries again.
func (a *Agent) syncForwardsLogged(ctx context.Context) {
	if err := a.syncForwards(ctx); err != nil {
		a.log.Warn("port forwards", "err", err)
	}
}

// deleteForwardsOf removes every forward of VM id (teardown): before its
// files go, since the files are how a restarted agent knows the VM was
// its own.
func (a *Agent) deleteForwardsOf(ctx context.Context, id string) error {
	a.fwdMu.Lock()
	defer a.fwdMu.Unlock()
	have, err := a.net.ListPortForwards(ctx)
	if err != nil {
		return fmt.Errorf("list port forwards: %w", err)
	}
	for _, f := range have {
		if f.VMID != id {
			continue
		}
		if err := a.net.DeletePortForward(ctx, f.Protocol, f.HostPort); err != nil {
			return fmt.Errorf("remove forward %s: %w", forwardKey(f), err)
		}
		a.log.Info("port forward removed with its VM", "vm", id, "host_port", forwardKey(f))
	}
	return nil
}
