package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/wait"
)

// The agent keeps its last full assignment set on disk, so that when it
// starts while the API is down (a control-plane outage, an upgrade, a
// restored etcd still loading) its guests still get DHCP leases, DNS and
// metadata: a guest that reboots or renews its lease then must not lose
// its address because of something that happened far from its host.
//
// The copy is for the guest services only. It never reaches a.assigned, so
// reconcile never creates, starts, stops or tears down a domain from it:
// only the live stream, whose BOOKMARK proves the set complete, may do
// that (see reconcile). Once the live stream has delivered its BOOKMARK
// the copy is dropped and the live set is served.
//
// The file is written only after a BOOKMARK (a partial set is never
// saved), atomically (a temporary file fsynced, renamed over the old one,
// the directory fsynced), bounded in size, and refused as a whole, with a
// log line, when it cannot be read back: a wrong answer to a guest is
// worse than none.

const (
	// assignmentCacheFile, in Config.StateDir.
	assignmentCacheFile = "assignments.json"
	// assignmentCacheFormat names the file's layout; another is refused.
	assignmentCacheFormat = "minicloud.assignments/v1"
	// DefaultAssignmentCacheMaxBytes bounds the file. A VM's spec is at
	// most 1 MiB and its user-data 64 KiB, but a typical one is a few
	// KiB: 64 MiB holds thousands of VMs. A larger set is not saved (and
	// the old file removed, so nothing stale is served).
	DefaultAssignmentCacheMaxBytes = 64 << 20
	// assignmentSaveInterval coalesces bursts of changes (every status
	// report comes back as a MODIFIED event) into at most a few writes a
	// second.
	assignmentSaveInterval = 250 * time.Millisecond
)

// savedAssignments is the file's JSON document.
type savedAssignments struct {
	Format      string            `json:"format"`
	Host        string            `json:"host"`
	SavedAt     time.Time         `json:"saved_at"`
	Assignments []savedAssignment `json:"assignments"`
}

type savedAssignment struct {
	VM       json.RawMessage `json:"vm"`                  // protojson of minicloudv1.VM
	UserData []byte          `json:"user_data,omitempty"` // base64 in JSON
}

func (a *Agent) assignmentCachePath() string {
	return filepath.Join(a.cfg.StateDir, assignmentCacheFile)
}

func (a *Agent) assignmentCacheMax() int64 {
	if a.cfg.AssignmentCacheMaxBytes > 0 {
		return a.cfg.AssignmentCacheMaxBytes
	}
	return DefaultAssignmentCacheMaxBytes
}

// assignmentsChanged asks the saver to write the set; it never blocks. The
// stream calls it only once its BOOKMARK has made the set complete.
func (a *Agent) assignmentsChanged() {
	select {
	case a.saveAssignments <- struct{}{}:
	default: // a save is already pending; it takes the newest set
	}
}

// saveAssignmentsLoop writes the set whenever it changed, at most every
// assignmentSaveInterval, and once more on the way out if a change is
// pending.
func (a *Agent) saveAssignmentsLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			select {
			case <-a.saveAssignments:
				a.writeAssignments()
			default:
			}
			return nil
		case <-a.saveAssignments:
			a.writeAssignments()
		}
		if !wait.Sleep(ctx, assignmentSaveInterval) {
			// Loop once more: the ctx case flushes a pending change.
			continue
		}
	}
}

// writeAssignments saves the current set, logging (not returning) errors:
// the copy is a fallback, never a reason to stop converging.
func (a *Agent) writeAssignments() {
	data, n, err := a.encodeAssignments()
	if err == nil && int64(len(data)) > a.assignmentCacheMax() {
		err = fmt.Errorf("%d bytes for %d VMs, over the %d-byte bound", len(data), n, a.assignmentCacheMax())
	}
	if err != nil {
		// An old copy would be served as if current after a restart:
		// better none.
		rmErr := os.Remove(a.assignmentCachePath())
		if rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			err = errors.Join(err, rmErr)
		}
		a.log.Warn("assignments not saved on disk: after a restart with the API down, guests get no DHCP, DNS or metadata until it answers", "err", err)
		return
	}
	if err := writeFileAtomic(a.assignmentCachePath(), data); err != nil {
		a.log.Warn("save assignments on disk", "err", err)
	}
}

// encodeAssignments snapshots a.assigned. The VMs are not copied: the
// stream replaces an assignment's VM, it never edits one in place.
func (a *Agent) encodeAssignments() ([]byte, int, error) {
	a.mu.Lock()
	snap := make([]*assignment, 0, len(a.assigned))
	for _, as := range a.assigned {
		snap = append(snap, as)
	}
	a.mu.Unlock()
	doc := savedAssignments{Format: assignmentCacheFormat, Host: a.cfg.HostName, SavedAt: time.Now().UTC(),
		Assignments: make([]savedAssignment, 0, len(snap))}
	for _, as := range snap {
		vm, err := protojson.Marshal(as.vm)
		if err != nil {
			return nil, 0, fmt.Errorf("encode VM %s: %w", as.vm.GetMeta().GetId(), err)
		}
		doc.Assignments = append(doc.Assignments, savedAssignment{VM: vm, UserData: as.userData})
	}
	data, err := json.Marshal(doc)
	return data, len(snap), err
}

// writeFileAtomic replaces path with data: a reader (or a crash) sees the
// old file or the new one, never a part.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp") // mode 0600: user-data may hold secrets
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename, a no-op
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	// The rename itself is durable only once the directory is.
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// loadAssignmentCache reads the saved set into a.cachedGuests, to be
// served until the live stream's first BOOKMARK. A missing file is normal
// (first start); an unreadable one is refused with a log line. It says
// whether there is anything to serve.
func (a *Agent) loadAssignmentCache() bool {
	guests, savedAt, err := a.readAssignmentCache()
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false
	case err != nil:
		a.log.Warn("saved assignments refused: guests get DHCP, DNS and metadata once the API answers", "file", a.assignmentCachePath(), "err", err)
		return false
	}
	a.mu.Lock()
	a.cachedGuests = make(map[string]Guest, len(guests))
	for _, g := range guests {
		id := g.VM.GetMeta().GetId()
		a.cachedGuests[id] = g
		a.guestsDirty[id] = true
	}
	a.mu.Unlock()
	a.log.Info("serving guests from the saved assignments until the API answers", "vms", len(guests), "saved_at", savedAt)
	return len(guests) > 0
}

func (a *Agent) readAssignmentCache() ([]Guest, time.Time, error) {
	f, err := os.Open(a.assignmentCachePath())
	if err != nil {
		return nil, time.Time{}, err
	}
	defer f.Close()
	max := a.assignmentCacheMax()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, time.Time{}, err
	}
	if int64(len(data)) > max {
		return nil, time.Time{}, fmt.Errorf("larger than the %d-byte bound", max)
	}
	var doc savedAssignments
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, time.Time{}, fmt.Errorf("corrupt: %w", err)
	}
	if doc.Format != assignmentCacheFormat {
		return nil, time.Time{}, fmt.Errorf("format %q, want %q", doc.Format, assignmentCacheFormat)
	}
	if doc.Host != a.cfg.HostName {
		return nil, time.Time{}, fmt.Errorf("saved by host %q, this is %q", doc.Host, a.cfg.HostName)
	}
	guests := make([]Guest, 0, len(doc.Assignments))
	seen := map[string]bool{}
	for i, s := range doc.Assignments {
		vm := &minicloudv1.VM{}
		// Unknown fields are an older agent reading a newer agent's file
		// (a downgrade): what it knows is still right.
		if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(s.VM, vm); err != nil {
			return nil, time.Time{}, fmt.Errorf("corrupt VM #%d: %w", i, err)
		}
		id := vm.GetMeta().GetId()
		if id == "" || seen[id] {
			return nil, time.Time{}, fmt.Errorf("VM #%d: missing or repeated id %q", i, id)
		}
		if h := vm.GetStatus().GetHost(); h != a.cfg.HostName {
			return nil, time.Time{}, fmt.Errorf("VM %s is assigned to host %q, not this one", id, h)
		}
		seen[id] = true
		guests = append(guests, Guest{VM: vm, UserData: s.UserData})
	}
	return guests, doc.SavedAt, nil
}
