package imageservice

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
)

// VerifiedGuard is how much older than the start of a verification a
// blob's last change (ctime) must be for the verification to be
// remembered. File systems stamp changes with a coarse clock (ext4: one
// kernel tick, 4 ms here; NFS servers: their own), so a write in the same
// tick as the verification would leave every timestamp as it was: git
// calls such entries "racily clean" and re-checks them for the same
// reason. Two seconds covers coarse clocks, not a network store whose
// server clock is further off than that.
const VerifiedGuard = 2 * time.Second

// verifiedMaxAge bounds how long a verification is trusted: decay under
// the file system (which changes no timestamp) is found by the API's own
// check at least this often, not only by the agents that refuse the bytes.
const verifiedMaxAge = 24 * time.Hour

// fileID is what identifies one version of a blob file: a write, truncate,
// chmod or replacement changes the inode or its change time, which no user
// can set back.
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // ns since the epoch
}

func identify(f *os.File) (fileID, error) {
	info, err := f.Stat()
	if err != nil {
		return fileID{}, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, fmt.Errorf("stat %s: no inode on this platform", f.Name())
	}
	return fileID{
		dev:   uint64(st.Dev),
		ino:   st.Ino,
		size:  st.Size,
		mtime: st.Mtim.Nano(),
		ctime: st.Ctim.Nano(),
	}, nil
}

// verifiedBlobs remembers which blob files DownloadImage has read in full
// and found to hash to their names, so that serving an unchanged file
// again does not hash it again (sha256 of a GiB costs ~0.75 s of CPU, half
// of what a download costs the API). It is only an optimisation of the
// API's own check: every agent verifies what it receives against the
// digest in the image's metadata, whatever the API does (docs/security.md,
// "Image integrity").
type verifiedBlobs struct {
	mu sync.Mutex
	m  map[string]verifiedEntry // by digest
	// now is time.Now; tests move it.
	now func() time.Time
}

type verifiedEntry struct {
	id fileID
	at time.Time // when the verification that found it intact began
}

func newVerifiedBlobs() *verifiedBlobs {
	return &verifiedBlobs{m: make(map[string]verifiedEntry), now: time.Now}
}

// verified says whether the file id, named digest, was found intact before
// and has not changed since.
func (v *verifiedBlobs) verified(digest string, id fileID) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	e, ok := v.m[digest]
	if !ok {
		return false
	}
	if e.id != id || v.now().Sub(e.at) > verifiedMaxAge {
		delete(v.m, digest)
		return false
	}
	return true
}

// remember records that a verification which began at began found the
// file id intact. A file changed within VerifiedGuard of began is not
// remembered: a later write could leave its timestamps unchanged.
func (v *verifiedBlobs) remember(digest string, id fileID, began time.Time) {
	if began.Sub(time.Unix(0, id.ctime)) < VerifiedGuard || began.Sub(time.Unix(0, id.mtime)) < VerifiedGuard {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.m[digest] = verifiedEntry{id: id, at: began}
}

// forget drops what is known about digest (its blob was found corrupt or
// removed).
func (v *verifiedBlobs) forget(digest string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.m, digest)
}
