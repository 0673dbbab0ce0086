package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// Network checks, asked for by GCE attributes set at create
// (`minicloud vm create --metadata mc-ping=a2,10.0.0.3/1422`), so a test can
// see from the serial console what a guest reaches:
//
//	mc-listen=PORT        a TCP listener answering "MINICLOUD-HELLO <hostname>"
//	mc-ping=T[/SIZE],...  ICMP echo with Don't Fragment, SIZE payload bytes (56)
//	mc-tcp=HOST:PORT,...  a TCP connection (and the peer's first line, if any)
//	mc-rounds=N           how many rounds of checks (20), mc-interval=SECONDS (3)
//
// Each check prints one line per round; a round ends with a ROUND line:
//
//	MINICLOUD-LISTEN port=<p> ok=<bool> error=<quoted>
//	MINICLOUD-CHECK round=<n> kind=ping|tcp target=<t> ok=<bool> detail=<quoted>
//	MINICLOUD-ROUND round=<n> done
//
// Rounds repeat because the peers boot at their own pace: a test looks for
// the round where a reachable peer answered, and checks an unreachable one
// never did in any round.

const checkTimeout = 2 * time.Second

// lines serialises the console lines of the checks, the listener and the
// watch, which run at once.
type lines struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (l *lines) printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, format, args...)
}

// attribute returns a GCE attribute ("" when unset).
func (c *client) attribute(ctx context.Context, key string) string {
	b, _, code, err := c.gceGet(ctx, c.http, gceAttributes+key)
	if err != nil || code != http.StatusOK {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// startChecks starts what the attributes ask for and reports whether the
// probe must stay alive afterwards (a listener serves until power-off).
// done is closed when the rounds are over.
func (c *client) startChecks(ctx context.Context, out *lines, hostname string) (serving bool, done <-chan struct{}) {
	finished := make(chan struct{})
	if p := c.attribute(ctx, "mc-listen"); p != "" {
		err := listen(p, hostname)
		out.printf("MINICLOUD-LISTEN port=%s ok=%t error=%q\n", p, err == nil, errString(err))
		serving = err == nil
	}
	pings := splitList(c.attribute(ctx, "mc-ping"))
	dials := splitList(c.attribute(ctx, "mc-tcp"))
	if len(pings) == 0 && len(dials) == 0 {
		close(finished)
		return serving, finished
	}
	rounds := atoiOr(c.attribute(ctx, "mc-rounds"), 20)
	interval := time.Duration(atoiOr(c.attribute(ctx, "mc-interval"), 3)) * time.Second
	go func() {
		defer close(finished)
		for r := 1; r <= rounds; r++ {
			for _, t := range pings {
				detail, err := ping(ctx, t)
				out.printf("MINICLOUD-CHECK round=%d kind=ping target=%s ok=%t detail=%q\n", r, t, err == nil, detailOr(detail, err))
			}
			for _, t := range dials {
				detail, err := dial(ctx, t)
				out.printf("MINICLOUD-CHECK round=%d kind=tcp target=%s ok=%t detail=%q\n", r, t, err == nil, detailOr(detail, err))
			}
			out.printf("MINICLOUD-ROUND round=%d done\n", r)
			time.Sleep(interval)
		}
	}()
	return serving, finished
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func atoiOr(s string, def int) int {
	if n, err := strconv.Atoi(s); err == nil && n > 0 && n <= 1000 {
		return n
	}
	return def
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func detailOr(detail string, err error) string {
	if err != nil {
		return err.Error()
	}
	return detail
}

// listen serves port: every connection gets one line naming this guest.
func listen(port, hostname string) error {
	ln, err := net.Listen("tcp4", net.JoinHostPort("0.0.0.0", port))
	if err != nil {
		return err
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			_ = conn.SetDeadline(time.Now().Add(checkTimeout))
			fmt.Fprintf(conn, "MINICLOUD-HELLO %s\n", hostname)
			conn.Close()
		}
	}()
	return nil
}

// dial opens TCP to target and returns the first line the peer sends.
func dial(ctx context.Context, target string) (string, error) {
	d := net.Dialer{Timeout: checkTimeout}
	conn, err := d.DialContext(ctx, "tcp4", target)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(checkTimeout))
	// Connected is success; the first line, if the peer sends one (an
	// mc-listen guest does, an HTTP server does not), says who answered.
	line, err := bufio.NewReader(io.LimitReader(conn, 256)).ReadString('\n')
	if err != nil {
		return fmt.Sprintf("%s connected, no line (%v)", conn.RemoteAddr(), err), nil
	}
	return fmt.Sprintf("%s %s", conn.RemoteAddr(), strings.TrimSpace(line)), nil
}

// ping sends one ICMP echo with Don't Fragment (IP_PMTUDISC_DO: a payload
// that does not fit the interface MTU fails with "message too long" instead
// of being fragmented) to target ("host" or "host/size") and waits for its
// reply. busybox's ping cannot set Don't Fragment.
func ping(ctx context.Context, target string) (string, error) {
	host, size := target, 56
	if h, s, ok := strings.Cut(target, "/"); ok {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > 65000 {
			return "", fmt.Errorf("bad size %q", s)
		}
		host, size = h, n
	}
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip4", host)
	if err != nil {
		return "", err
	}
	dst := addrs[0].Unmap()
	pc, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return "", err
	}
	defer pc.Close()
	conn := pc.(*net.IPConn)
	rc, err := conn.SyscallConn()
	if err != nil {
		return "", err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_MTU_DISCOVER, syscall.IP_PMTUDISC_DO)
	}); err != nil || serr != nil {
		return "", fmt.Errorf("set Don't Fragment: %v %v", err, serr)
	}
	id, seq := os.Getpid()&0xffff, int(time.Now().UnixNano()&0x7fff)
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: make([]byte, size)}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return "", err
	}
	start := time.Now()
	if _, err := conn.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return "", fmt.Errorf("send to %s: %w", dst, err)
	}
	deadline, _ := ctx.Deadline()
	_ = conn.SetReadDeadline(deadline)
	buf := make([]byte, 65536)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return "", fmt.Errorf("no reply from %s: %w", dst, err)
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq && from.String() == dst.String() {
			return fmt.Sprintf("%s bytes=%d rtt=%s", dst, len(e.Data), time.Since(start).Round(time.Millisecond)), nil
		}
	}
}
