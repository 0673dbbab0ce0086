package hypervisor

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
)

// MaxConsoleBackups is how many rotated console files ReadConsoleTail looks
// at. libvirt's virtlogd keeps 3 by default (max_backups in virtlogd.conf).
const MaxConsoleBackups = 8

// ReadConsoleTail returns the last n bytes a domain wrote to its serial
// console. The log is rotated by the hypervisor in the logrotate style that
// virtlogd uses — path is the newest file, path.0 the one before, then path.1
// and so on — so the tail may span the current file and its backups. A log
// that does not exist yet reads as empty.
func ReadConsoleTail(path string, n int64) ([]byte, error) {
	if n <= 0 {
		return nil, nil
	}
	files := []string{path}
	for i := 0; i < MaxConsoleBackups; i++ {
		files = append(files, path+"."+strconv.Itoa(i))
	}
	// Collect newest-first until n bytes are covered, then emit oldest-first.
	var chunks [][]byte
	remaining := n
	for _, f := range files {
		if remaining == 0 {
			break
		}
		b, err := readTail(f, remaining)
		if errors.Is(err, fs.ErrNotExist) {
			if f == path {
				continue // rotated right now, or never written
			}
			break
		}
		if err != nil {
			return nil, err
		}
		chunks = append(chunks, b)
		remaining -= int64(len(b))
	}
	out := make([]byte, 0, n-remaining)
	for i := len(chunks) - 1; i >= 0; i-- {
		out = append(out, chunks[i]...)
	}
	return out, nil
}

func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat console log %s: %w", path, err)
	}
	off := st.Size() - n
	if off < 0 {
		off = 0
	}
	b, err := io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
	if err != nil {
		return nil, fmt.Errorf("read console log %s: %w", path, err)
	}
	return b, nil
}
