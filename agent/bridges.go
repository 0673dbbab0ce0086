package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Bridges are shared by the VMs of one network on this host, so they are
// created by the first VM's reconcile and removed once no VM assigned here
// uses them. The agent records each bridge it created as a file under
// StateDir/bridges: after a restart it still knows which bridges are its own,
// and never removes one that another minicloud on the same host made.

func (a *Agent) bridgeMarker(name string) string {
	return filepath.Join(a.cfg.StateDir, "bridges", name)
}

// claimBridge records that this agent owns bridge name. Called with
// bridgeMu held (read-locked: concurrent claims of one name write the same
// empty file), before the bridge is created.
func (a *Agent) claimBridge(name string) error {
	p := a.bridgeMarker(name)
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("record bridge %s: %w", name, err)
	}
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		return fmt.Errorf("record bridge %s: %w", name, err)
	}
	return nil
}

// collectBridges deletes this agent's bridges that no assigned VM uses.
func (a *Agent) collectBridges(ctx context.Context) error {
	a.bridgeMu.Lock()
	defer a.bridgeMu.Unlock()
	entries, err := os.ReadDir(filepath.Join(a.cfg.StateDir, "bridges"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list bridges: %w", err)
	}
	a.mu.Lock()
	used := map[string]bool{}
	for _, as := range a.assigned {
		if as.vm.GetSpec().GetDeletionRequested() {
			continue
		}
		for _, addr := range as.vm.GetStatus().GetAddresses() {
			used[addr.GetBridge()] = true
		}
	}
	synced := a.synced
	a.mu.Unlock()
	if !synced {
		return nil
	}
	for _, e := range entries {
		name := e.Name()
		if used[name] {
			continue
		}
		a.log.Info("deleting bridge no VM on this host uses", "bridge", name)
		a.forgetTunnel(name)
		if err := a.net.DeleteBridge(ctx, name); err != nil {
			return fmt.Errorf("delete bridge %s: %w", name, err)
		}
		if err := os.Remove(a.bridgeMarker(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("forget bridge %s: %w", name, err)
		}
	}
	return nil
}
