package netnstest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Reachability without timeouts: StartConnects sends SYNs to several
// destinations in order, and a test accepts the last one (a destination that
// must be reachable) on its listener. Handshakes complete in the order the
// SYNs left, so by then every earlier destination that was reachable has a
// connection waiting in its listener's queue: Pending tells, without waiting.

// StartConnects starts non-blocking TCP connects from the namespace to each
// destination, in order. The returned function closes the sockets.
func (n *NS) StartConnects(dsts ...netip.AddrPort) (closeAll func(), err error) {
	var fds []int
	closeAll = func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	err = n.Do(func() error {
		for _, to := range dsts {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
			err = unix.Connect(fd, &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()})
			if err != nil && !errors.Is(err, unix.EINPROGRESS) {
				return fmt.Errorf("connect %s: %w", to, err)
			}
		}
		return nil
	})
	if err != nil {
		closeAll()
		return func() {}, err
	}
	return closeAll, nil
}

// Pending reports whether a connection waits in l's accept queue, without
// blocking (Go's listening sockets are non-blocking); it consumes it.
func Pending(l *net.TCPListener) (bool, error) {
	rc, err := l.SyscallConn()
	if err != nil {
		return false, err
	}
	var got bool
	var aerr error
	if err := rc.Control(func(fd uintptr) {
		nfd, _, err := unix.Accept4(int(fd), unix.SOCK_CLOEXEC)
		switch {
		case err == nil:
			unix.Close(nfd)
			got = true
		case !errors.Is(err, unix.EAGAIN):
			aerr = err
		}
	}); err != nil {
		return false, err
	}
	if aerr != nil {
		return false, fmt.Errorf("accept on %s: %w", l.Addr(), aerr)
	}
	return got, nil
}
