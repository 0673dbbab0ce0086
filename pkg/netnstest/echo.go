package netnstest

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/net/icmp"
	xipv4 "golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

var echoSeq atomic.Uint32

// Echo sends one ICMP echo with size bytes of payload and Don't Fragment
// set from the current network namespace (inside Guest.Do, or a process
// started in the namespace) and waits up to timeout for its reply. It
// returns the round-trip time, from just before the send to the reply's
// arrival. Needs root (a raw ICMP socket).
func Echo(dst netip.Addr, size int, timeout time.Duration) (time.Duration, error) {
	c, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return 0, err
	}
	defer c.Close()
	rc, err := c.(*net.IPConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	}); err != nil || serr != nil {
		return 0, fmt.Errorf("set DF: %v %v", err, serr)
	}
	id, seq := os.Getpid()&0xffff, int(echoSeq.Add(1)&0xffff)
	body := bytes.Repeat([]byte{0xa5}, size)
	msg := icmp.Message{Type: xipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: body}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return 0, err
	}
	sent := time.Now()
	if _, err := c.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return 0, fmt.Errorf("send echo: %w", err)
	}
	_ = c.SetReadDeadline(sent.Add(timeout))
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return 0, fmt.Errorf("no echo reply from %s: %w", dst, err)
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != xipv4.ICMPTypeEchoReply || from.String() != dst.String() {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq && bytes.Equal(e.Data, body) {
			return time.Since(sent), nil
		}
	}
}
