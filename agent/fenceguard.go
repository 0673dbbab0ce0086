package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
)

// The fence guard is self-fencing that does not need a live agent (sbd's
// watchdog, in Pacemaker's terms). The agent touches StateDir/last-contact
// on every successful registration and heartbeat; the guard, a separate
// process (`minicloudd fence-guard`), destroys every domain of the agent's
// VMs once that file is older than FenceAfter. So a host whose agent was
// killed while QEMU kept running still runs nothing by the time the control
// plane counts it FENCED, and an evacuated VM never runs twice. Starting
// domains again stays the agent's job, under its own rules (fencing.go).

// LastContactFile is the file the agent touches on every contact with the
// API, under its state directory.
const LastContactFile = "last-contact"

// touchLastContact records a contact for the fence guard.
func (a *Agent) touchLastContact() {
	p := filepath.Join(a.cfg.StateDir, LastContactFile)
	now := time.Now()
	if err := os.Chtimes(p, now, now); errors.Is(err, os.ErrNotExist) {
		err = os.WriteFile(p, nil, 0o600)
	} else if err != nil {
		a.log.Warn("record last contact for the fence guard", "file", p, "err", err)
	}
}

// FenceGuard destroys the domains of the VMs under stateDir (its vms/
// directories) while stateDir/last-contact is older than fenceAfter, until
// ctx ends. A missing file means the agent never made contact on this host
// yet: nothing to guard.
func FenceGuard(ctx context.Context, stateDir string, fenceAfter time.Duration, hv hypervisor.Driver, log *slog.Logger) error {
	if fenceAfter <= 0 {
		return fmt.Errorf("fence guard: --fence-after must be positive, got %s", fenceAfter)
	}
	t := time.NewTicker(fenceCheckPeriod)
	defer t.Stop()
	fenced := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		fi, err := os.Stat(filepath.Join(stateDir, LastContactFile))
		if err != nil {
			continue
		}
		stale := time.Since(fi.ModTime()) > fenceAfter
		if stale != fenced {
			fenced = stale
			if stale {
				log.Error("fence guard: the agent has had no contact with the API for longer than --fence-after: destroying this host's domains", "last_contact", fi.ModTime(), "fence_after", fenceAfter)
			} else {
				log.Info("fence guard: the agent is in contact again")
			}
		}
		if !stale {
			continue
		}
		entries, err := os.ReadDir(filepath.Join(stateDir, "vms"))
		if err != nil {
			log.Warn("fence guard: list VM directories", "err", err)
			continue
		}
		var ids []string
		for _, e := range entries {
			if e.IsDir() {
				ids = append(ids, e.Name())
			}
		}
		fenceStopDomains(ctx, hv, ids, func(id string) string { return filepath.Join(stateDir, "vms", id) }, log.With("by", "fence guard"))
	}
}
