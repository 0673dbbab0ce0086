// Package dnsserver is the guests' resolver: one small DNS server per guest
// network, listening on the network's gateway address, port 53 (UDP and
// TCP). It answers metadata.google.internal (the name GCE guest tools use
// for the metadata service) and the names of the network's VMs itself, and
// forwards every other question to the host's resolvers.
package dnsserver

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// MetadataName is answered with MetadataAddr on every network.
const MetadataName = "metadata.google.internal."

// MetadataAddr is the metadata service's address.
var MetadataAddr = netip.MustParseAddr("169.254.169.254")

const (
	// recordTTL is short: VMs come and go, and answers are cheap.
	recordTTL = 30
	// forwardTimeout bounds one upstream exchange.
	forwardTimeout = 2 * time.Second
	// retryInterval is how often a listener that failed to start is retried.
	retryInterval = 5 * time.Second
)

// Zone is what the server answers for one guest network.
type Zone struct {
	// Listen is the gateway address the network's guests use as resolver.
	Listen netip.Addr
	// Domain is the network's search domain (e.g. "default.mc.internal"); VM
	// names are answered both bare and under it. Empty: bare names only.
	Domain string
	// Records maps VM names (case-insensitive, without the domain) to addresses.
	Records map[string]netip.Addr
}

// zone is the compiled form of a Zone. Its listen address and domain never
// change; its records change one at a time (SetRecord, RemoveRecord), so a
// filling network costs one update per VM, not a rebuild.
type zone struct {
	listen netip.Addr
	domain string // lower case, fully qualified ("" when none)

	mu      sync.RWMutex
	records map[string]netip.Addr          // bare lower-case name -> address
	names   map[string]netip.Addr          // fully qualified lower-case names
	owners  map[netip.Addr]map[string]bool // address -> bare names (for PTR)
}

// set adds or replaces one record; z.mu must be held.
func (z *zone) set(network, name string, addr netip.Addr) error {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	if _, ok := dns.IsDomainName(n); !ok || n == "" || !addr.Is4() {
		return fmt.Errorf("zone %s: bad record %q -> %s", network, name, addr)
	}
	z.remove(n)
	z.records[n] = addr
	z.names[n+"."] = addr
	if z.domain != "" {
		z.names[n+"."+z.domain] = addr
	}
	if z.owners[addr] == nil {
		z.owners[addr] = map[string]bool{}
	}
	z.owners[addr][n] = true
	return nil
}

// remove forgets one record (a bare name, any case); z.mu must be held.
func (z *zone) remove(name string) {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	addr, ok := z.records[n]
	if !ok {
		return
	}
	delete(z.records, n)
	delete(z.names, n+".")
	if z.domain != "" {
		delete(z.names, n+"."+z.domain)
	}
	delete(z.owners[addr], n)
	if len(z.owners[addr]) == 0 {
		delete(z.owners, addr)
	}
}

// ptr is the fully qualified name a reverse lookup of addr answers: the
// first in order when several names share it, so the answer does not
// depend on the order the records came in. z.mu must be held.
func (z *zone) ptr(addr netip.Addr) (string, bool) {
	first := ""
	for n := range z.owners[addr] {
		if first == "" || n < first {
			first = n
		}
	}
	if first == "" {
		return "", false
	}
	if z.domain != "" {
		return first + "." + z.domain, true
	}
	return first + ".", true
}

// Option configures a Server.
type Option func(*Server)

// WithUpstreams sets the resolvers questions are forwarded to, instead of
// the nameservers of /etc/resolv.conf.
func WithUpstreams(addrs ...netip.AddrPort) Option {
	return func(s *Server) { s.upstreams = addrs; s.resolvConf = "" }
}

// WithResolvConf reads the upstream resolvers from another file.
func WithResolvConf(path string) Option { return func(s *Server) { s.resolvConf = path } }

// WithPort listens on another port than 53 (tests that cannot use 53).
func WithPort(port uint16) Option { return func(s *Server) { s.port = port } }

// Server serves every network's zone. Create it with New, feed it with
// SetZone/RemoveZone (any time, from any goroutine) and call Run.
type Server struct {
	log        *slog.Logger
	port       uint16
	resolvConf string
	upstreams  []netip.AddrPort // fixed by WithUpstreams, else read by Run

	mu    sync.Mutex
	zones map[string]*zone // network -> zone; guarded by mu
	// byListen is an immutable map listen address -> zone read by handlers.
	byListen atomic.Pointer[map[netip.Addr]*zone]
	ups      atomic.Pointer[[]netip.AddrPort]
	kick     chan struct{}

	servingMu sync.Mutex
	serving   map[netip.Addr]bool
	changed   chan struct{}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(log *slog.Logger) Option { return func(s *Server) { s.log = log } }

// New returns a Server with no zones.
func New(opts ...Option) *Server {
	s := &Server{
		port:       53,
		resolvConf: "/etc/resolv.conf",
		zones:      map[string]*zone{},
		kick:       make(chan struct{}, 1),
		serving:    map[netip.Addr]bool{},
		changed:    make(chan struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	s.log = cmp.Or(s.log, slog.Default()).With("component", "dnsserver")
	empty := map[netip.Addr]*zone{}
	s.byListen.Store(&empty)
	ups := s.upstreams
	s.ups.Store(&ups)
	return s
}

// SetZone atomically replaces the zone of one network. Invalid records are
// skipped (and reported in the error); the others are served.
func (s *Server) SetZone(network string, z Zone) error {
	if !z.Listen.Is4() {
		return fmt.Errorf("zone %s: listen address %q is not IPv4", network, z.Listen)
	}
	c := &zone{listen: z.Listen, records: map[string]netip.Addr{}, names: map[string]netip.Addr{}, owners: map[netip.Addr]map[string]bool{}}
	if z.Domain != "" {
		c.domain = dns.Fqdn(strings.ToLower(z.Domain))
	}
	var errs []error
	for name, addr := range z.Records {
		if err := c.set(network, name, addr); err != nil {
			errs = append(errs, err)
		}
	}
	s.mu.Lock()
	for other, oz := range s.zones {
		if other != network && oz.listen == z.Listen {
			s.mu.Unlock()
			return fmt.Errorf("zone %s: %s already serves network %s", network, z.Listen, other)
		}
	}
	s.zones[network] = c
	s.publishLocked()
	s.mu.Unlock()
	return errors.Join(errs...)
}

// SetRecord adds or replaces one name of a network's zone (set with
// SetZone); the zone's other records are not touched.
func (s *Server) SetRecord(network, name string, addr netip.Addr) error {
	s.mu.Lock()
	z := s.zones[network]
	s.mu.Unlock()
	if z == nil {
		return fmt.Errorf("zone %s: no such zone", network)
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.set(network, name, addr)
}

// RemoveRecord forgets one name of a network's zone; unknown networks and
// names are ignored.
func (s *Server) RemoveRecord(network, name string) {
	s.mu.Lock()
	z := s.zones[network]
	s.mu.Unlock()
	if z == nil {
		return
	}
	z.mu.Lock()
	z.remove(name)
	z.mu.Unlock()
}

// Zone returns what the server answers for a network: its listen address,
// domain (fully qualified, lower case) and records (bare lower-case names).
func (s *Server) Zone(network string) (Zone, bool) {
	s.mu.Lock()
	z := s.zones[network]
	s.mu.Unlock()
	if z == nil {
		return Zone{}, false
	}
	z.mu.RLock()
	defer z.mu.RUnlock()
	return Zone{Listen: z.listen, Domain: z.domain, Records: maps.Clone(z.records)}, true
}

// RemoveZone stops serving a network; it is a no-op for an unknown one.
func (s *Server) RemoveZone(network string) {
	s.mu.Lock()
	delete(s.zones, network)
	s.publishLocked()
	s.mu.Unlock()
}

func (s *Server) publishLocked() {
	m := make(map[netip.Addr]*zone, len(s.zones))
	for _, z := range s.zones {
		m[z.listen] = z
	}
	s.byListen.Store(&m)
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// WaitServing blocks until the server listens (UDP and TCP) on addr.
func (s *Server) WaitServing(ctx context.Context, addr netip.Addr) error {
	for {
		s.servingMu.Lock()
		on, ch := s.serving[addr], s.changed
		s.servingMu.Unlock()
		if on {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("DNS server not listening on %s: %w", addr, ctx.Err())
		case <-ch:
		}
	}
}

func (s *Server) setServing(addr netip.Addr, on bool) {
	s.servingMu.Lock()
	defer s.servingMu.Unlock()
	if on {
		s.serving[addr] = true
	} else {
		delete(s.serving, addr)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

type listener struct {
	udp, tcp *dns.Server
	done     chan struct{}
}

// Run serves until ctx ends, opening and closing listeners as zones come
// and go.
func (s *Server) Run(ctx context.Context) error {
	if s.resolvConf != "" {
		ups, err := ReadResolvConf(s.resolvConf)
		if err != nil {
			s.log.Warn("no upstream resolvers: only local names will resolve", "err", err)
		}
		s.ups.Store(&ups)
	}
	listeners := map[netip.Addr]*listener{}
	defer func() {
		for addr, l := range listeners {
			s.stop(addr, l)
		}
	}()
	tick := time.NewTicker(retryInterval)
	defer tick.Stop()
	for {
		want := *s.byListen.Load()
		for addr, l := range listeners {
			if _, ok := want[addr]; !ok {
				s.stop(addr, l)
				delete(listeners, addr)
			}
		}
		for addr := range want {
			if _, ok := listeners[addr]; ok {
				continue
			}
			l, err := s.start(addr)
			if err != nil {
				s.log.Warn("cannot listen", "addr", addr, "err", err)
				continue
			}
			listeners[addr] = l
			s.setServing(addr, true)
			s.log.Info("serving", "addr", addr)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-tick.C:
		}
	}
}

// start opens UDP and TCP sockets on addr. IP_FREEBIND lets them bind before
// the bridge has its address (the agent may set up DNS first), and keeps
// them valid while the bridge is re-created.
func (s *Server) start(addr netip.Addr) (*listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
		})
		return errors.Join(err, serr)
	}}
	ap := netip.AddrPortFrom(addr, s.port).String()
	pc, err := lc.ListenPacket(context.Background(), "udp4", ap)
	if err != nil {
		return nil, fmt.Errorf("listen udp %s: %w", ap, err)
	}
	tl, err := lc.Listen(context.Background(), "tcp4", ap)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("listen tcp %s: %w", ap, err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) { s.serve(addr, w, r) })
	l := &listener{
		udp:  &dns.Server{PacketConn: pc, Handler: h},
		tcp:  &dns.Server{Listener: tl, Handler: h},
		done: make(chan struct{}),
	}
	var wg sync.WaitGroup
	for _, srv := range []*dns.Server{l.udp, l.tcp} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ActivateAndServe(); err != nil {
				s.log.Warn("serve", "addr", ap, "err", err)
			}
		}()
	}
	go func() { wg.Wait(); close(l.done) }()
	return l, nil
}

func (s *Server) stop(addr netip.Addr, l *listener) {
	_ = l.udp.Shutdown()
	_ = l.tcp.Shutdown()
	<-l.done
	s.setServing(addr, false)
	s.log.Info("stopped serving", "addr", addr)
}

func (s *Server) serve(listen netip.Addr, w dns.ResponseWriter, req *dns.Msg) {
	z := (*s.byListen.Load())[listen]
	resp := s.answer(z, req, w.RemoteAddr().Network())
	if resp == nil {
		return
	}
	if err := w.WriteMsg(resp); err != nil {
		s.log.Debug("write answer", "err", err)
	}
}

// answer builds the reply to req; nil means drop the query.
func (s *Server) answer(z *zone, req *dns.Msg, network string) *dns.Msg {
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		m := new(dns.Msg)
		return m.SetRcode(req, dns.RcodeNotImplemented)
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	local := func(a netip.Addr) *dns.Msg {
		m := new(dns.Msg)
		m.SetReply(req)
		m.Authoritative = true
		if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: recordTTL}, A: a.AsSlice()}}
		}
		return m // other types: NOERROR with no data
	}
	if name == MetadataName {
		return local(MetadataAddr)
	}
	if z != nil {
		z.mu.RLock()
		a, ok := z.names[name]
		var target string
		var isPTR bool
		if q.Qtype == dns.TypePTR {
			if addr, err := reverseAddr(name); err == nil {
				target, isPTR = z.ptr(addr)
			}
		}
		z.mu.RUnlock()
		if ok {
			return local(a)
		}
		if q.Qtype == dns.TypePTR {
			if isPTR {
				m := new(dns.Msg)
				m.SetReply(req)
				m.Authoritative = true
				m.Answer = []dns.RR{&dns.PTR{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: recordTTL}, Ptr: target}}
				return m
			}
		}
		if z.domain != "" && (name == z.domain || strings.HasSuffix(name, "."+z.domain)) {
			// The network's own domain is never asked of anybody else.
			m := new(dns.Msg)
			m.SetRcode(req, dns.RcodeNameError)
			m.Authoritative = true
			return m
		}
	}
	return s.forward(req, network)
}

// reverseAddr is the IPv4 address of a reverse name
// ("5.0.88.10.in-addr.arpa." is 10.88.0.5).
func reverseAddr(name string) (netip.Addr, error) {
	rest, ok := strings.CutSuffix(name, ".in-addr.arpa.")
	labels := strings.Split(rest, ".")
	if !ok || len(labels) != 4 {
		return netip.Addr{}, fmt.Errorf("%q is not an IPv4 reverse name", name)
	}
	slices.Reverse(labels)
	return netip.ParseAddr(strings.Join(labels, "."))
}

// forward asks the upstream resolvers, skipping any address this server
// listens on (which would loop) and the metadata address.
func (s *Server) forward(req *dns.Msg, network string) *dns.Msg {
	c := &dns.Client{Net: "udp", Timeout: forwardTimeout}
	if network == "tcp" {
		c.Net = "tcp"
	}
	for _, up := range s.forwardTargets() {
		resp, _, err := c.Exchange(req, up.String())
		if err != nil {
			s.log.Debug("upstream failed", "upstream", up, "err", err)
			continue
		}
		return resp
	}
	m := new(dns.Msg)
	return m.SetRcode(req, dns.RcodeServerFailure)
}

// forwardTargets are the upstreams minus anything that would loop back to
// this server (a gateway it listens on, the metadata address, 0.0.0.0).
func (s *Server) forwardTargets() []netip.AddrPort {
	listening := *s.byListen.Load()
	var out []netip.AddrPort
	for _, up := range *s.ups.Load() {
		if _, ours := listening[up.Addr()]; ours || up.Addr() == MetadataAddr || up.Addr().IsUnspecified() {
			continue
		}
		out = append(out, up)
	}
	return out
}

// ReadResolvConf returns the nameservers of a resolv.conf file, port 53.
func ReadResolvConf(path string) ([]netip.AddrPort, error) {
	cfg, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	var out []netip.AddrPort
	for _, s := range cfg.Servers {
		a, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s lists no usable nameserver", path)
	}
	return out, nil
}
