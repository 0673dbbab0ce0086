package apiserver

import (
	"bufio"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// plaintextRefusal is what a client that dialled a TLS API without TLS
// hears, instead of a bare "connection closed" it cannot act on.
const plaintextRefusal = "this minicloud API serves TLS only: connect with TLS and trust the cluster CA " +
	"(minicloud: --ca-cert FILE or `ca:` in ~/.config/minicloud/config.yaml; the API writes the CA to DATA_DIR/ca.crt; agents: --join with --ca-hash)"

// tlsOnlyListener sorts the connections of one listener by their first
// byte: TLS handshakes (a handshake record, 0x16) go to the gRPC server,
// anything else to a plaintext gRPC server that refuses every call with
// UNAUTHENTICATED and plaintextRefusal. Nothing but the refusal is ever
// served in plaintext.
type tlsOnlyListener struct {
	net.Listener
	tls, plain *chanListener
	refuser    *grpc.Server
}

func newTLSOnlyListener(inner net.Listener) *tlsOnlyListener {
	l := &tlsOnlyListener{
		Listener: inner,
		tls:      newChanListener(inner),
		plain:    newChanListener(inner),
		refuser: grpc.NewServer(grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
			return status.Error(codes.Unauthenticated, plaintextRefusal)
		})),
	}
	go l.acceptLoop()
	go func() { _ = l.refuser.Serve(l.plain) }()
	return l
}

// sniffTimeout bounds how long a connection may stay silent before it is
// dropped unsorted.
const sniffTimeout = 10 * time.Second

func (l *tlsOnlyListener) acceptLoop() {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			l.tls.fail(err)
			l.plain.fail(err)
			return
		}
		go func() {
			_ = c.SetReadDeadline(time.Now().Add(sniffTimeout))
			r := bufio.NewReader(c)
			first, err := r.Peek(1)
			_ = c.SetReadDeadline(time.Time{})
			if err != nil {
				c.Close()
				return
			}
			pc := &peekedConn{Conn: c, r: r}
			if first[0] == 0x16 {
				l.tls.deliver(pc)
			} else {
				l.plain.deliver(pc)
			}
		}()
	}
}

// stop closes the listener and the refusing server.
func (l *tlsOnlyListener) stop() {
	l.Listener.Close()
	l.refuser.Stop()
}

type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// chanListener is a net.Listener fed from a channel.
type chanListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	mu    sync.Mutex
	err   error
}

func newChanListener(inner net.Listener) *chanListener {
	return &chanListener{addr: inner.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) deliver(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *chanListener) fail(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
	}
	l.mu.Unlock()
	l.Close()
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.err != nil {
			return nil, l.err
		}
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }
