package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// OpenConsole implements hypervisor.Driver with virDomainOpenConsole on the
// domain's first serial port (a pty chardev, see domainxml.go). libvirt
// allows one console stream per domain; without the FORCE flag a second
// open fails ("Active console session exists"), which is reported as
// Conflict rather than stealing the stream from its holder.
//
// A stream that libvirtd ends as it opens, while the domain still runs, is
// opened again (a few times, briefly apart): it has been seen right after
// the previous stream's release on a loaded host, and the guest's console
// is there all the same.
func (d *Driver) OpenConsole(ctx context.Context, vmID string) (io.ReadWriteCloser, error) {
	l, dom, _, err := d.lookup(ctx, vmID)
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		if err := consoleReady(l, dom, vmID); err != nil {
			return nil, err
		}
		c, err := openConsoleStream(ctx, l, dom, vmID)
		if !errors.Is(err, errEndedAsOpened) {
			return c, err
		}
		if attempt == consoleOpenAttempts {
			return nil, errdefs.FailedPrecondition("console of %s ended as it opened, %d times (the guest stopped?)", vmID, attempt)
		}
		select {
		case <-time.After(consoleReopenDelay):
		case <-ctx.Done():
			return nil, errdefs.Wrap(errdefs.KindUnavailable, ctx.Err(), "open console of %s", vmID)
		}
	}
}

// How often, and how far apart, a console stream that ends as it opens is
// opened again.
const (
	consoleOpenAttempts = 5
	consoleReopenDelay  = 200 * time.Millisecond
)

var errEndedAsOpened = errors.New("console stream ended as it opened")

// consoleReady fails with FailedPrecondition unless the domain runs.
func consoleReady(l *golibvirt.Libvirt, dom golibvirt.Domain, vmID string) error {
	state, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		return classify(err, "state of %s", vmID)
	}
	if s := golibvirt.DomainState(state); s != golibvirt.DomainRunning && s != golibvirt.DomainBlocked && s != golibvirt.DomainPaused {
		st, _ := translateState(s, 0)
		return errdefs.FailedPrecondition("domain of %s is %s: a console needs a running guest", vmID, st)
	}
	return nil
}

// openConsoleStream opens one console stream; errEndedAsOpened when
// libvirtd ended it before it started.
func openConsoleStream(ctx context.Context, l *golibvirt.Libvirt, dom golibvirt.Domain, vmID string) (io.ReadWriteCloser, error) {
	inR, inW := io.Pipe()   // our writes -> libvirt -> guest
	outR, outW := io.Pipe() // guest -> libvirt -> our reads
	// go-libvirt starts sending our input only after libvirtd accepted the
	// open, so the first read of inR is the sign that the stream is up; an
	// error before that is the open's answer.
	started := make(chan struct{})
	var once sync.Once
	in := readerFunc(func(p []byte) (int, error) {
		once.Do(func() { close(started) })
		return inR.Read(p)
	})
	done := make(chan error, 1)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		err := l.DomainOpenConsoleBidirectional(dom, nil, in, discardClosed{outW}, 0)
		// The stream ended (guest stopped, Close, lost connection): end
		// both halves so neither go-libvirt's sender nor our reader waits.
		if err == nil {
			err = io.EOF
		}
		outW.CloseWithError(err)
		inR.CloseWithError(errConsoleClosed)
		done <- err
	}()
	select {
	case <-started:
	case err := <-done:
		if err == io.EOF {
			return nil, errEndedAsOpened
		}
		var lerr golibvirt.Error
		if errors.As(err, &lerr) && golibvirt.ErrorNumber(lerr.Code) == golibvirt.ErrOperationFailed {
			return nil, errdefs.Wrap(errdefs.KindConflict, err, "open console of %s: another client holds it", vmID)
		}
		if errors.As(err, &lerr) && strings.Contains(lerr.Message, "not using a PTY") {
			// Defined by an older minicloud, whose serial port wrote to
			// the log file only.
			return nil, errdefs.FailedPrecondition("the domain of %s has no console to attach to (defined by an older minicloud: its serial port only writes the console log)", vmID)
		}
		return nil, classify(err, "open console of %s", vmID)
	case <-ctx.Done():
		inW.CloseWithError(errConsoleClosed)
		outR.CloseWithError(errConsoleClosed)
		return nil, errdefs.Wrap(errdefs.KindUnavailable, ctx.Err(), "open console of %s", vmID)
	}
	return &console{in: inW, out: outR, ended: ended}, nil
}

// discardClosed drops output once our reader is closed: the stream must
// run on until libvirtd confirms the end (the console is held till then),
// and go-libvirt would abandon it on a write error.
type discardClosed struct{ w *io.PipeWriter }

func (d discardClosed) Write(p []byte) (int, error) {
	n, err := d.w.Write(p)
	if err == io.ErrClosedPipe {
		return len(p), nil
	}
	return n, err
}

// releaseTimeout bounds how long Close waits for libvirtd to confirm the
// end of the stream.
const releaseTimeout = 10 * time.Second

var errConsoleClosed = errors.New("console closed")

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// console is one open libvirt console stream.
type console struct {
	in    *io.PipeWriter
	out   *io.PipeReader
	ended chan struct{} // closed when libvirtd ended the stream
}

func (c *console) Read(p []byte) (int, error) {
	n, err := c.out.Read(p)
	if err == io.ErrClosedPipe {
		err = io.EOF // closed by Close
	}
	return n, err
}

func (c *console) Write(p []byte) (int, error) {
	n, err := c.in.Write(p)
	if err != nil {
		return n, fmt.Errorf("write to console: %w", err)
	}
	return n, nil
}

// Close finishes the stream (end of input tells libvirtd we are done),
// stops delivering output at once, so go-libvirt's receiver never blocks on
// output nobody reads (it would stall the whole connection), and returns
// once libvirtd has released the console, so that the next OpenConsole
// finds it free.
func (c *console) Close() error {
	c.in.Close()
	c.out.Close()
	select {
	case <-c.ended:
		return nil
	case <-time.After(releaseTimeout):
		return errdefs.Unavailable("libvirtd did not confirm the end of the console stream within %s", releaseTimeout)
	}
}
