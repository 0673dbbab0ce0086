package hypervisortest

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// fakeConsole plays a guest shell on a serial line: it echoes what is typed
// (as a tty in cooked mode does, "\n" as "\r\n") and answers a line
// "echo WORDS" with WORDS, single quotes removed as a shell would. Output
// goes through a pipe, so a reader that stops reading stalls the writer, as
// with the real driver.
type fakeConsole struct {
	h   *FakeHost
	dom *fakeDomain
	r   *io.PipeReader
	w   *io.PipeWriter

	mu   sync.Mutex // serialises Write; line is the current input line
	line []byte
	once sync.Once
}

// OpenConsole implements hypervisor.Driver.
func (d *FakeDriver) OpenConsole(_ context.Context, vmID string) (io.ReadWriteCloser, error) {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err := h.lookup(vmID)
	if err != nil {
		return nil, err
	}
	if !dom.running {
		return nil, errdefs.FailedPrecondition("domain of %s is %s: a console needs a running guest", vmID, dom.state)
	}
	if dom.console != nil {
		return nil, errdefs.Conflict("open console of %s: another client holds it", vmID)
	}
	r, w := io.Pipe()
	c := &fakeConsole{h: h, dom: dom, r: r, w: w}
	dom.console = c
	return c, nil
}

func (c *fakeConsole) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err == io.ErrClosedPipe {
		err = io.EOF
	}
	return n, err
}

func (c *fakeConsole) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out bytes.Buffer
	for _, b := range p {
		switch b {
		case '\r', '\n':
			out.WriteString("\r\n")
			if cmd, ok := strings.CutPrefix(strings.TrimSpace(string(c.line)), "echo "); ok {
				out.WriteString(strings.ReplaceAll(cmd, "'", "") + "\r\n")
			}
			out.WriteString("# ")
			c.line = c.line[:0]
		default:
			out.WriteByte(b)
			c.line = append(c.line, b)
		}
	}
	if _, err := c.w.Write(out.Bytes()); err != nil {
		return 0, errdefs.FailedPrecondition("write to console: %v", err)
	}
	c.h.mu.Lock()
	c.dom.cpuWork += time.Duration(len(p)) * time.Millisecond
	c.h.mu.Unlock()
	return len(p), nil
}

// Close releases the console for the next OpenConsole.
func (c *fakeConsole) Close() error {
	c.h.mu.Lock()
	c.release()
	c.h.mu.Unlock()
	return nil
}

// release ends the stream. Called with h.mu held.
func (c *fakeConsole) release() {
	c.once.Do(func() {
		c.w.CloseWithError(io.EOF)
		c.r.Close()
		if c.dom.console == c {
			c.dom.console = nil
		}
	})
}

// Stats implements hypervisor.Driver: CPU time is the time since start
// plus the work the console made the guest do; the other counters are
// derived from the spec.
func (d *FakeDriver) Stats(_ context.Context, vmID string) (hypervisor.DomainStats, error) {
	h := d.host
	h.mu.Lock()
	defer h.mu.Unlock()
	dom, err := h.lookup(vmID)
	if err != nil {
		return hypervisor.DomainStats{}, err
	}
	if !dom.running {
		return hypervisor.DomainStats{}, errdefs.FailedPrecondition("domain of %s is %s: only a running guest has counters", vmID, dom.state)
	}
	now := time.Now()
	st := hypervisor.DomainStats{
		Time:            now,
		CPUTimeNs:       uint64(now.Sub(dom.started) + dom.cpuWork),
		VCPUs:           dom.spec.VCPUs,
		MemoryActualKiB: uint64(dom.spec.MemoryMiB) << 10,
		MemoryRSSKiB:    uint64(dom.spec.MemoryMiB) << 9,
		Disks:           []hypervisor.DiskStats{{Device: "vda"}},
	}
	if dom.spec.ConfigDrivePath != "" {
		st.Disks = append(st.Disks, hypervisor.DiskStats{Device: "hdc"})
	}
	for _, n := range dom.spec.NICs {
		st.Interfaces = append(st.Interfaces, hypervisor.InterfaceStats{Device: n.TapName})
	}
	return st, nil
}
