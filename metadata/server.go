package metadata

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"
	"golang.org/x/time/rate"
)

// Address is where guests reach the metadata service.
const Address = "169.254.169.254:80"

// Request limits: no metadata request needs a body, and cloud-init's
// headers are a few hundred bytes.
const (
	maxBodyBytes   = 4 << 10
	maxHeaderBytes = 8 << 10
	readTimeout    = 5 * time.Second
)

// Options configure a Server. The zero value is usable.
type Options struct {
	Logger *slog.Logger
	// IdentityKey signs EC2 instance identity documents (Ed25519 or RSA);
	// without it dynamic/instance-identity/signature is not served.
	IdentityKey crypto.Signer
	// Identity signs workload identity tokens (GCE's
	// service-accounts/default/identity); without it that path is 404.
	Identity IdentitySource
	// Neighbours resolves source MACs for bridge listeners (default: the
	// kernel's neighbour table over netlink).
	Neighbours NeighbourTable
	// RateLimit and RateBurst bound the requests of one VM (default 50/s,
	// burst 200: a cloud-init crawl is ~60 requests).
	RateLimit rate.Limit
	RateBurst int
	// TokenSecret keys IMDSv2 tokens (default: random per process).
	TokenSecret []byte
	// Registerer receives the Prometheus collectors (none when nil).
	Registerer prometheus.Registerer
	// MaxLongPoll caps GCE wait_for_change (default 5 minutes).
	MaxLongPoll time.Duration
	// MaxConnsPerGuest and MaxConns bound open connections from one
	// source address on one bridge (default 64) and in all (default
	// 4096): beyond, a new connection is closed at once.
	MaxConnsPerGuest, MaxConns int
	// MaxWaitsPerGuest and MaxWaits bound hanging wait_for_change
	// requests of one VM (default 16) and in all (default 1024): beyond,
	// 429 Too Many Requests.
	MaxWaitsPerGuest, MaxWaits int
	// ListenAddress is what bridge listeners bind (default Address).
	ListenAddress string
	// Now is the clock (tests).
	Now func() time.Time
	// FrontEnd is how connections are served (default defaultFrontEnd).
	FrontEnd FrontEnd
	// OnFirstRequest, if set, is called (synchronously, so it must not
	// block) the first time a VM is answered: the agent's signal that the
	// guest is up, without polling LastSeen.
	OnFirstRequest func(vmID string)
}

// Server answers metadata requests for the instances in a Directory. One
// Server serves a Directory (rendered trees are cached on its entries).
type Server struct {
	dir  *Directory
	opts Options
	// fakeClock is set when Options.Now is a test's clock: requests then
	// read it rather than fasthttp's time of the request.
	fakeClock bool
	log       *slog.Logger
	tokens    *tokenMinter
	// idTokens caches workload identity tokens (nil without
	// Options.Identity).
	idTokens *tokenCache
	metrics  *metrics
	// http serves every listener (bridges and handed-over ones) with
	// FrontEndGoroutines: fasthttp rather than net/http, which parses into
	// buffers reused per connection and answers from the connection's own
	// goroutine, with no per-request goroutine, context, header map or
	// header clone, which were a quarter of the service's CPU per request
	// (docs/benchmarks.md).
	http *fasthttp.Server
	// loop serves the listeners instead of http's goroutines with
	// FrontEndEventLoop (nil otherwise); http still holds the timeouts
	// and limits both front ends use.
	loop *eventLoop

	baseCtx    context.Context
	cancelBase context.CancelFunc

	limMu    sync.Mutex
	limiters map[string]*guestState

	conns *connLimits
	waits atomic.Int64 // hanging wait_for_change requests in all

	unknownLog        *rate.Limiter
	unknownSuppressed atomic.Int64

	mu        sync.Mutex
	closed    bool
	listeners map[string]*bridgeListener
	wg        sync.WaitGroup
}

// bridgeListener is the listener of one bridge, remembered with the
// bridge's ifindex: SO_BINDTODEVICE binds the index, so a bridge deleted and
// created again under the same name needs a new socket.
type bridgeListener struct {
	net.Listener
	ifindex int
}

// NewServer returns a Server over dir. It serves nothing until interfaces
// are added (AddInterface) or a listener is handed over (ServeListener).
func NewServer(dir *Directory, opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Neighbours == nil {
		opts.Neighbours = NetlinkNeighbours{}
	}
	if opts.RateLimit == 0 {
		opts.RateLimit = 50
	}
	if opts.RateBurst == 0 {
		opts.RateBurst = 200
	}
	if opts.MaxLongPoll == 0 {
		opts.MaxLongPoll = 5 * time.Minute
	}
	if opts.ListenAddress == "" {
		opts.ListenAddress = Address
	}
	if opts.MaxConnsPerGuest == 0 {
		opts.MaxConnsPerGuest = 64
	}
	if opts.MaxConns == 0 {
		opts.MaxConns = 4096
	}
	if opts.MaxWaitsPerGuest == 0 {
		opts.MaxWaitsPerGuest = 16
	}
	if opts.MaxWaits == 0 {
		opts.MaxWaits = 1024
	}
	if opts.FrontEnd == FrontEndDefault {
		opts.FrontEnd = defaultFrontEnd
	}
	fakeClock := opts.Now != nil
	if !fakeClock {
		opts.Now = time.Now
	}
	tokens, err := newTokenMinter(opts.TokenSecret)
	if err != nil {
		return nil, err
	}
	s := &Server{
		dir:        dir,
		opts:       opts,
		log:        opts.Logger.With("component", "metadata"),
		tokens:     tokens,
		metrics:    newMetrics(opts.Registerer),
		limiters:   map[string]*guestState{},
		unknownLog: rate.NewLimiter(1, 5),
		listeners:  map[string]*bridgeListener{},
		fakeClock:  fakeClock,
	}
	s.conns = newConnLimits(opts.MaxConnsPerGuest, opts.MaxConns, s.metrics.connsRefused.Inc)
	if opts.Identity != nil {
		s.idTokens = newTokenCache(opts.Identity)
	}
	s.baseCtx, s.cancelBase = context.WithCancel(context.Background())
	s.http = &fasthttp.Server{
		Handler:      s.handle,
		ErrorHandler: s.handleError,
		// No Server header: net/http sent none, and a guest learns nothing
		// from one.
		NoDefaultServerHeader: true,
		// Timeouts and sizes as with net/http before: a request (header
		// and body) must arrive within ReadTimeout of its first byte (of
		// the connection's opening, for the first one), a response be
		// written within WriteTimeout, an idle keep-alive connection is
		// closed after IdleTimeout, each at most deadlineSlack later
		// (peerConn arms them lazily). Long-polls wait in the handler,
		// which no deadline covers (fasthttp starts the write deadline
		// after the handler returns).
		ReadTimeout:  readTimeout,
		WriteTimeout: 10 * time.Second,
		IdleTimeout:  60 * time.Second,
		// The read buffer bounds the request line and headers.
		ReadBufferSize: maxHeaderBytes,
		// No metadata request needs a body; never buffer more than a
		// token's worth (a larger one is refused with 413 before the
		// handler).
		MaxRequestBodySize: maxBodyBytes,
		// Connections are capped per guest and in all by peerListener;
		// fasthttp's own per-IP cap would not know the bridge.
		Logger: fasthttpLogger{opts.Logger},
	}
	if opts.FrontEnd == FrontEndEventLoop {
		if s.loop, err = newEventLoop(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// AddInterface starts answering on a bridge: a listener on 169.254.169.254:80
// bound to the device, so only packets that arrived on it are accepted. The
// bridge must exist; the address may be added to it before or after. It is
// idempotent: calling it again for a served bridge is a no-op, unless the
// bridge was re-created (new ifindex), in which case the listener is
// replaced.
func (s *Server) AddInterface(name string) error {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("metadata: add interface %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("metadata: add interface %s: server closed", name)
	}
	if old, ok := s.listeners[name]; ok {
		if old.ifindex == ifi.Index {
			return nil
		}
		_ = old.Close()
		delete(s.listeners, name)
	}
	l, err := listenOnDevice(context.Background(), name, s.opts.ListenAddress)
	if err != nil {
		return fmt.Errorf("metadata: add interface %s: %w", name, err)
	}
	wl := &peerListener{Listener: l, resolver: bridgeResolver{iface: name, neigh: s.opts.Neighbours}, scope: name, limits: s.conns}
	s.listeners[name] = &bridgeListener{Listener: wl, ifindex: ifi.Index}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.serveOn(wl); err != nil && !errors.Is(err, net.ErrClosed) {
			s.log.Error("metadata listener stopped", "interface", name, "err", err)
		}
	}()
	s.log.Info("metadata service listening", "interface", name, "address", s.opts.ListenAddress)
	return nil
}

// RemoveInterface stops answering on a bridge (unknown names are ignored).
func (s *Server) RemoveInterface(name string) error {
	s.mu.Lock()
	l, ok := s.listeners[name]
	delete(s.listeners, name)
	s.mu.Unlock()
	if !ok {
		return nil
	}
	if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("metadata: remove interface %s: %w", name, err)
	}
	return nil
}

// SyncInterfaces makes the served bridges exactly names: the level-triggered
// form of AddInterface/RemoveInterface for the agent's reconcile loop. It
// tries every bridge and returns the errors joined.
func (s *Server) SyncInterfaces(names []string) error {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	var errs []error
	for _, n := range s.Interfaces() {
		if !want[n] {
			errs = append(errs, s.RemoveInterface(n))
		}
	}
	for _, n := range names {
		errs = append(errs, s.AddInterface(n))
	}
	return errors.Join(errs...)
}

// Interfaces lists the bridges being served.
func (s *Server) Interfaces() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.listeners))
	for n := range s.listeners {
		out = append(out, n)
	}
	return out
}

// ServeListener answers on l, identifying peers with r (unit tests and the
// benchmark: loopback has no bridge). It blocks until the server closes.
func (s *Server) ServeListener(l net.Listener, r PeerResolver) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("metadata: server closed")
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	err := s.serveOn(&peerListener{Listener: l, resolver: r, scope: l.Addr().String(), limits: s.conns})
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// serveOn serves l with the front end of the options until l closes.
func (s *Server) serveOn(l *peerListener) error {
	if s.loop != nil {
		return s.loop.serve(l)
	}
	return s.http.Serve(l)
}

// Serve blocks until ctx ends, then closes every listener and waits for
// requests in flight (long-polls are cut short).
func (s *Server) Serve(ctx context.Context) error {
	<-ctx.Done()
	return s.Close()
}

// Close stops the server.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.listeners = map[string]*bridgeListener{}
	s.mu.Unlock()
	// Long-polls and identity calls end first, so the shutdown below
	// finds every connection between requests.
	s.cancelBase()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var err error
	if s.loop != nil {
		err = s.loop.close()
	} else {
		err = s.http.ShutdownWithContext(ctx)
	}
	s.wg.Wait()
	if err != nil {
		return fmt.Errorf("metadata: shutdown: %w", err)
	}
	return nil
}

// fasthttpLogger sends fasthttp's own messages (accept errors, connections
// it gave up on) to the service's log at debug level, as net/http's
// ErrorLog was.
type fasthttpLogger struct{ log *slog.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	l.log.Debug(fmt.Sprintf(format, args...), "component", "metadata")
}
