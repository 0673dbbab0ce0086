package metadata

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// Address is where guests reach the metadata service.
const Address = "169.254.169.254:80"

const maxBodyBytes = 4 << 10

// Options configure a Server. The zero value is usable.
type Options struct {
	Logger *slog.Logger
	// IdentityKey signs EC2 instance identity documents (Ed25519 or RSA);
	// without it dynamic/instance-identity/signature is not served.
	IdentityKey crypto.Signer
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
	// ListenAddress is what bridge listeners bind (default Address).
	ListenAddress string
	// Now is the clock (tests).
	Now func() time.Time
}

// Server answers metadata requests for the instances in a Directory. One
// Server serves a Directory (rendered trees are cached on its entries).
type Server struct {
	dir     *Directory
	opts    Options
	log     *slog.Logger
	tokens  *tokenMinter
	metrics *metrics
	http    *http.Server

	baseCtx    context.Context
	cancelBase context.CancelFunc

	limMu    sync.Mutex
	limiters map[string]*guestState

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
	if opts.Now == nil {
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
	}
	s.baseCtx, s.cancelBase = context.WithCancel(context.Background())
	s.http = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    8 << 10,
		BaseContext:       func(net.Listener) context.Context { return s.baseCtx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(*peerConn); ok {
				return context.WithValue(ctx, peerConnKey{}, pc)
			}
			return ctx
		},
		ErrorLog: slog.NewLogLogger(opts.Logger.Handler(), slog.LevelDebug),
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
	wl := &peerListener{Listener: l, resolver: bridgeResolver{iface: name, neigh: s.opts.Neighbours}}
	s.listeners[name] = &bridgeListener{Listener: wl, ifindex: ifi.Index}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.http.Serve(wl); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
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
	err := s.http.Serve(&peerListener{Listener: l, resolver: r})
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
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
	s.cancelBase()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.http.Shutdown(ctx)
	s.wg.Wait()
	if err != nil {
		return fmt.Errorf("metadata: shutdown: %w", err)
	}
	return nil
}

// peerListener tags accepted connections with the resolver that identifies
// them.
type peerListener struct {
	net.Listener
	resolver PeerResolver
}

func (l *peerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &peerConn{Conn: c, resolver: l.resolver}, nil
}

// peerConn resolves its peer once per connection: the bridge and the
// source address cannot change within one TCP connection, and anti-spoofing
// filters keep the source MAC honest.
type peerConn struct {
	net.Conn
	resolver PeerResolver
	once     sync.Once
	peer     Peer
	err      error

	macOnce sync.Once
	mac     net.HardwareAddr
	macErr  error
}

func (c *peerConn) resolve() (Peer, error) {
	c.once.Do(func() { c.peer, c.err = c.resolver.ResolvePeer(c.Conn) })
	return c.peer, c.err
}

// sourceMAC is the peer's MAC, looked up at most once per connection.
func (c *peerConn) sourceMAC() (net.HardwareAddr, error) {
	c.macOnce.Do(func() {
		c.mac = c.peer.MAC
		if mr, ok := c.resolver.(macResolver); ok && c.mac == nil {
			c.mac, c.macErr = mr.resolveMAC(c.peer)
		}
	})
	return c.mac, c.macErr
}

type peerConnKey struct{}

// statusRecorder remembers the status code for metrics.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func treeOf(path string) string {
	switch {
	case path == "/openstack" || strings.HasPrefix(path, "/openstack/"):
		return "openstack"
	case path == "/computeMetadata" || strings.HasPrefix(path, "/computeMetadata/"):
		return "gce"
	default:
		return "ec2"
	}
}

// request is one identified request.
type request struct {
	w     http.ResponseWriter
	r     *http.Request
	pc    *peerConn
	peer  Peer
	mac   net.HardwareAddr
	entry *entry
	trees *rendered
	// longPoll marks GCE waits so their duration stays out of the latency
	// histogram.
	longPoll bool
}

// ServeHTTP identifies the guest, rate-limits it and dispatches to the tree.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	// No metadata request needs a body; never buffer more than a token.
	r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
	rec := &statusRecorder{ResponseWriter: w}
	tree := treeOf(r.URL.Path)
	req := &request{w: rec, r: r}
	s.serve(req, tree)
	if rec.code == 0 {
		rec.code = http.StatusOK
	}
	s.metrics.observe(tree, rec.code, time.Since(start), req.longPoll)
}

func (s *Server) serve(req *request, tree string) {
	r := req.r
	if r.URL.RawPath != "" || len(r.URL.Path) > maxPathLen {
		notFound(req)
		return
	}
	pc, _ := r.Context().Value(peerConnKey{}).(*peerConn)
	if pc == nil {
		s.logUnknown("connection without peer identity", "remote", r.RemoteAddr)
		notFound(req)
		return
	}
	req.pc = pc
	peer, err := pc.resolve()
	if err != nil {
		s.logUnknown("unidentified metadata request", "remote", r.RemoteAddr, "err", err)
		notFound(req)
		return
	}
	req.peer = peer
	// Cheap checks first: the address must map to an instance and that
	// instance must be within its rate limit before the host's neighbour
	// table is read for the MAC.
	e := s.dir.lookup(peer.Interface, peer.Addr)
	if e == nil {
		s.logUnknown("metadata request from unknown source", "interface", peer.Interface, "source", peer.Addr)
		notFound(req)
		return
	}
	if !s.allow(e.inst.ID) {
		writeText(req, http.StatusTooManyRequests, "Too Many Requests")
		return
	}
	mac, err := pc.sourceMAC()
	if err == nil {
		e, err = s.dir.identify(peer, mac)
	}
	if err != nil {
		s.logUnknown("metadata request from unknown source", "interface", peer.Interface, "source", peer.Addr, "mac", mac.String(), "err", err)
		notFound(req)
		return
	}
	req.mac = mac
	s.markSeen(e.inst.ID)
	if err := s.use(req, e); err != nil {
		s.log.Error("render metadata", "instance", e.inst.ID, "err", err)
		writeText(req, http.StatusInternalServerError, "Internal Server Error")
		return
	}
	switch tree {
	case "openstack":
		s.serveOpenStack(req)
	case "gce":
		s.serveGCE(req)
	default:
		s.serveEC2(req)
	}
}

// use makes e the request's entry, rendering its trees on first use.
func (s *Server) use(req *request, e *entry) error {
	e.renderOnce.Do(func() { e.rendered, e.renderErr = render(e.inst, s.opts.IdentityKey) })
	if e.renderErr != nil {
		return e.renderErr
	}
	req.entry, req.trees = e, e.rendered
	return nil
}

func render(inst *Instance, signer crypto.Signer) (*rendered, error) {
	ec2, err := ec2Tree(inst, signer)
	if err != nil {
		return nil, err
	}
	os, err := openstackTree(inst)
	if err != nil {
		return nil, err
	}
	return &rendered{ec2: ec2, openstack: os, gce: gceTree(inst)}, nil
}

// guestState is what the server keeps per VM: its rate limiter and when it
// was last answered.
type guestState struct {
	lim      *rate.Limiter
	lastSeen atomic.Int64 // unix nanoseconds
}

// allow applies the per-VM rate limit.
func (s *Server) allow(id string) bool {
	s.limMu.Lock()
	g, ok := s.limiters[id]
	if !ok {
		if len(s.limiters) > 2*s.dir.Len()+64 {
			for k := range s.limiters {
				if _, live := s.dir.Get(k); !live {
					delete(s.limiters, k)
				}
			}
		}
		g = &guestState{lim: rate.NewLimiter(s.opts.RateLimit, s.opts.RateBurst)}
		s.limiters[id] = g
	}
	s.limMu.Unlock()
	return g.lim.Allow()
}

// markSeen records that the VM was answered.
func (s *Server) markSeen(id string) {
	s.limMu.Lock()
	g := s.limiters[id]
	s.limMu.Unlock()
	if g != nil {
		g.lastSeen.Store(s.opts.Now().UnixNano())
	}
}

// LastSeen reports when the VM last had a request identified and let
// through the rate limit — the agent's evidence that the guest is up and
// reading its metadata.
func (s *Server) LastSeen(vmID string) (time.Time, bool) {
	s.limMu.Lock()
	g, ok := s.limiters[vmID]
	s.limMu.Unlock()
	if !ok {
		return time.Time{}, false
	}
	ns := g.lastSeen.Load()
	if ns == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, ns), true
}

// logUnknown logs refused sources at most about once a second, counting
// what it left out, so a guest scanning the service cannot flood the log.
func (s *Server) logUnknown(msg string, args ...any) {
	s.metrics.unknownSources.Inc()
	if !s.unknownLog.Allow() {
		s.unknownSuppressed.Add(1)
		return
	}
	if n := s.unknownSuppressed.Swap(0); n > 0 {
		args = append(args, "suppressed", n)
	}
	s.log.Warn(msg, args...)
}

func writeBody(req *request, code int, contentType string, body []byte) {
	h := req.w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	req.w.WriteHeader(code)
	if req.r.Method != http.MethodHead {
		_, _ = req.w.Write(body)
	}
}

func writeText(req *request, code int, msg string) {
	writeBody(req, code, "text/plain; charset=utf-8", []byte(msg))
}

func notFound(req *request) { writeText(req, http.StatusNotFound, "Not Found") }

func methodNotAllowed(req *request, allow string) {
	req.w.Header().Set("Allow", allow)
	writeText(req, http.StatusMethodNotAllowed, "Method Not Allowed")
}

func isRead(r *http.Request) bool { return r.Method == http.MethodGet || r.Method == http.MethodHead }

// writeNode answers with a leaf's body or a directory's listing.
func writeNode(req *request, n *node) {
	if n == nil || (n.dir && len(n.body) == 0) {
		notFound(req)
		return
	}
	ct := n.contentType
	if ct == "" {
		ct = "text/plain"
	}
	writeBody(req, http.StatusOK, ct, n.body)
}
