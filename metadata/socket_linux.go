package metadata

import (
	"context"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenOnDevice listens on addr with the socket bound to one interface
// (SO_BINDTODEVICE): it accepts only connections that arrived on that
// interface, so the arrival bridge is known for certain and one listener per
// bridge can share 169.254.169.254:80.
func listenOnDevice(ctx context.Context, iface, addr string) (net.Listener, error) {
	lc := net.ListenConfig{
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, iface)
				if serr == nil {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
				}
				// Bind even before 169.254.169.254 is on the bridge: the
				// listener starts answering as soon as the network code
				// adds it, whatever the order of the two.
				if serr == nil {
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	l, err := lc.Listen(ctx, "tcp4", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s bound to %s: %w", addr, iface, err)
	}
	return l, nil
}

// setIPTTL sets the IP TTL of packets the connection sends from now on.
// The IMDSv2 token response leaves with TTL 1: it reaches the guest on the
// bridge but dies at the first router, so a host NATed behind the guest
// (a container, an SSRF-reachable proxy) never receives a token.
func setIPTTL(c net.Conn, ttl int) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("set IP TTL: %T has no socket", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("set IP TTL: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, ttl)
	}); err != nil {
		return fmt.Errorf("set IP TTL: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("set IP TTL %d: %w", ttl, serr)
	}
	return nil
}
