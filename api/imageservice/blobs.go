package imageservice

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// tempPrefix marks uploads in progress in the blob directory. Anything with
// this prefix that no upload owns is debris from a crash.
const tempPrefix = ".upload-"

// blobDir is a content-addressed directory: every committed blob is named
// by the hex sha256 of its bytes, so identical parts of different images
// are stored once and a name can never point at other content.
type blobDir struct {
	dir string
}

func (d blobDir) path(sha string) string { return filepath.Join(d.dir, sha) }

// create starts a new blob as the temporary file name (which must start
// with tempPrefix) in the directory, so the final rename stays on one
// filesystem.
func (d blobDir) create(name string) (*blobWriter, error) {
	f, err := os.OpenFile(filepath.Join(d.dir, name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create temp blob in %s: %w", d.dir, err)
	}
	return &blobWriter{dir: d, f: f, h: sha256.New()}, nil
}

// remove deletes a committed blob; a blob already gone is not an error.
func (d blobDir) remove(sha string) error {
	if err := os.Remove(d.path(sha)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove blob %s: %w", sha, err)
	}
	return nil
}

// isBlobName says whether name looks like a committed blob (64 hex digits).
func isBlobName(name string) bool {
	if len(name) != sha256.Size*2 {
		return false
	}
	_, err := hex.DecodeString(name)
	return err == nil && strings.ToLower(name) == name
}

// blobWriter hashes and counts what is written to a temporary blob.
type blobWriter struct {
	dir  blobDir
	f    *os.File
	h    hash.Hash
	size int64
	done bool
	// released: the upload key of the temporary file was dropped.
	released bool
}

func (w *blobWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	w.size += int64(n)
	if err != nil {
		return n, fmt.Errorf("write %s: %w", w.f.Name(), err)
	}
	return n, nil
}

func (w *blobWriter) tempName() string { return filepath.Base(w.f.Name()) }

// commit makes the temporary file the blob named by its digest. If that blob
// exists already (same content uploaded before), the temporary file is
// dropped instead. created says whether a new blob file appeared.
func (w *blobWriter) commit() (sha string, size int64, created bool, err error) {
	defer w.abort()
	sha = hex.EncodeToString(w.h.Sum(nil))
	if err := w.f.Sync(); err != nil {
		return "", 0, false, fmt.Errorf("sync %s: %w", w.f.Name(), err)
	}
	if err := w.f.Close(); err != nil {
		return "", 0, false, fmt.Errorf("close %s: %w", w.f.Name(), err)
	}
	final := w.dir.path(sha)
	if _, err := os.Stat(final); err == nil {
		return sha, w.size, false, nil
	}
	if err := os.Rename(w.f.Name(), final); err != nil {
		return "", 0, false, fmt.Errorf("commit blob %s: %w", sha, err)
	}
	w.done = true
	// The rename must survive a crash before the metadata is written, or
	// the metadata would name a blob that is not there.
	if err := syncDir(w.dir.dir); err != nil {
		return sha, w.size, true, err
	}
	return sha, w.size, true, nil
}

// abort removes the temporary file unless it was committed. It is safe to
// call more than once.
func (w *blobWriter) abort() {
	if w.done {
		return
	}
	w.done = true
	w.f.Close()
	os.Remove(w.f.Name())
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
