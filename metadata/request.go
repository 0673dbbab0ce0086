package metadata

import (
	"bytes"
	"crypto"
	"errors"
	"net"
	"net/url"
	"runtime/debug"
	"strings"
	"time"
	"unsafe"

	"github.com/valyala/fasthttp"
)

// Trees are what the metrics tell apart.
type tree uint8

const (
	treeEC2 tree = iota
	treeOpenStack
	treeGCE
	numTrees
)

var treeNames = [numTrees]string{treeEC2: "ec2", treeOpenStack: "openstack", treeGCE: "gce"}

func treeOf(path string) tree {
	switch {
	case path == "/openstack" || strings.HasPrefix(path, "/openstack/"):
		return treeOpenStack
	case path == "/computeMetadata" || strings.HasPrefix(path, "/computeMetadata/"):
		return treeGCE
	default:
		return treeEC2
	}
}

// request is one identified request.
type request struct {
	ctx *fasthttp.RequestCtx
	// path and query are the request target's, as net/http would give
	// them (URL.Path decoded, URL.RawQuery as sent); see parseTarget.
	path, query string
	pc          *peerConn
	peer        Peer
	mac         net.HardwareAddr
	entry       *entry
	trees       *rendered
	// guest is the VM's limiter and last-seen time, once identified.
	guest *guestState
	// code is the status written (by writeBodyHeaders, the one place that
	// writes), for the metrics.
	code int
	// longPoll marks GCE waits so their duration stays out of the latency
	// histogram.
	longPoll bool
}

// isRead says whether the request is a GET or HEAD.
func (req *request) isRead() bool { return req.ctx.IsGet() || req.ctx.IsHead() }

// header is the value of the request header key (canonical form), empty
// when absent; it is valid until the handler returns.
func (req *request) header(key string) []byte {
	return req.ctx.Request.Header.Peek(key)
}

// hasHeader says whether the request carries key at all, even empty.
func (req *request) hasHeader(key string) bool {
	return len(req.ctx.Request.Header.PeekAll(key)) > 0
}

// queryValues parses the query as net/http's URL.Query does.
func (req *request) queryValues() url.Values {
	q, _ := url.ParseQuery(req.query)
	return q
}

// handle identifies the guest, rate-limits it and dispatches to the tree;
// every request is counted and timed.
func (s *Server) handle(ctx *fasthttp.RequestCtx) {
	// fasthttp reads the clock for every request just before the handler:
	// its time is the start, and the limiter's and last-seen clock.
	start := ctx.Time()
	req := &request{ctx: ctx}
	path, query, canonical, ok := parseTarget(ctx.Request.Header.RequestURI())
	t := treeOf(path)
	switch {
	case !ok:
		writeText(req, fasthttp.StatusBadRequest, "Bad Request")
	case !canonical:
		// Encoded otherwise than net/http would encode its decoded
		// form (URL.RawPath set): never a well-behaved client's.
		notFound(req)
	default:
		req.path, req.query = path, query
		s.serveRecovered(req, t)
	}
	if req.code == 0 {
		// Nothing written (the client left a long-poll, or the service
		// is stopping): the answer is an empty 200.
		req.code = fasthttp.StatusOK
	}
	s.metrics.observe(t, req.code, time.Since(start), req.longPoll)
}

// serveRecovered is serve with a panic answered 500 and logged: fasthttp,
// unlike net/http, does not recover handlers, and the service shares its
// process with the agent.
func (s *Server) serveRecovered(req *request, t tree) {
	defer func() {
		if v := recover(); v != nil {
			s.log.Error("metadata handler panicked", "path", req.path, "panic", v, "stack", string(debug.Stack()))
			req.ctx.Response.Reset()
			req.ctx.SetConnectionClose()
			writeText(req, fasthttp.StatusInternalServerError, "Internal Server Error")
		}
	}()
	s.serve(req, t)
}

// handleError answers a request fasthttp could not read (headers over the
// limit, a body over the limit, a timeout mid-request, a malformed
// request) and counts it; a connection that sent nothing is not a request.
func (s *Server) handleError(ctx *fasthttp.RequestCtx, err error) {
	code, msg := fasthttp.StatusBadRequest, "Bad Request"
	var small *fasthttp.ErrSmallBuffer
	var ne net.Error
	switch {
	case errors.As(err, &small):
		code, msg = fasthttp.StatusRequestHeaderFieldsTooLarge, "Request Header Fields Too Large"
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		code, msg = fasthttp.StatusRequestEntityTooLarge, "Request Entity Too Large"
	case errors.As(err, &ne) && ne.Timeout():
		code, msg = fasthttp.StatusRequestTimeout, "Request Timeout"
	}
	req := &request{ctx: ctx}
	writeText(req, code, msg)
	uri := ctx.Request.Header.RequestURI()
	if len(uri) == 0 {
		return
	}
	path, _, _ := bytes.Cut(uri, []byte("?"))
	s.metrics.observe(treeOf(string(path)), code, 0, true)
}

// parseTarget splits a request target into path and query as net/http
// does (url.ParseRequestURI): path is URL.Path, query URL.RawQuery. A path
// made only of bytes that need no escaping is its own decoded form, so
// that common case is a plain split; anything else goes through net/url.
// canonical is false when URL.RawPath would be set (an encoding other than
// the canonical one of the decoded path, which the trees never need); ok
// is false when net/http would refuse the target with 400.
func parseTarget(target []byte) (path, query string, canonical, ok bool) {
	rawPath, rawQuery, _ := bytes.Cut(target, []byte("?"))
	if len(rawPath) > 0 && rawPath[0] == '/' && plainPath(rawPath) {
		// Views of fasthttp's request buffer, not copies: they are read
		// only while the handler runs (which a long-poll's wait is part
		// of), and nothing keeps them after it.
		return unsafe.String(&rawPath[0], len(rawPath)), bytesView(rawQuery), true, true
	}
	u, err := url.ParseRequestURI(string(target))
	if err != nil {
		return "", "", false, false
	}
	return u.Path, u.RawQuery, u.RawPath == "", true
}

func bytesView(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

// plainPath says whether p holds only bytes that net/url leaves as they
// are in a path (unreserved and the sub-delimiters it does not escape).
func plainPath(p []byte) bool {
	for _, c := range p {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '-' || c == '_' || c == '.' || c == '~' || c == '/' || c == '$' || c == '&' || c == '+' || c == ',' || c == ':' || c == ';' || c == '=' || c == '@':
		default:
			return false
		}
	}
	return true
}

func (s *Server) serve(req *request, t tree) {
	if len(req.path) > maxPathLen {
		notFound(req)
		return
	}
	pc, _ := req.ctx.Conn().(*peerConn)
	if pc == nil {
		s.logUnknown("connection without peer identity", "remote", req.ctx.RemoteAddr().String())
		notFound(req)
		return
	}
	req.pc = pc
	peer, err := pc.resolve()
	if err != nil {
		s.logUnknown("unidentified metadata request", "remote", req.ctx.RemoteAddr().String(), "err", err)
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
	g, ok := s.allow(e, s.requestTime(req))
	if !ok {
		writeText(req, fasthttp.StatusTooManyRequests, "Too Many Requests")
		return
	}
	req.guest = g
	mac, err := pc.sourceMAC()
	if err == nil {
		err = e.checkMAC(peer, mac)
	}
	if err != nil {
		s.logUnknown("metadata request from unknown source", "interface", peer.Interface, "source", peer.Addr, "mac", mac.String(), "err", err)
		notFound(req)
		return
	}
	req.mac = mac
	s.markSeen(g, e.inst.ID, s.requestTime(req))
	if err := s.use(req, e); err != nil {
		s.log.Error("render metadata", "instance", e.inst.ID, "err", err)
		writeText(req, fasthttp.StatusInternalServerError, "Internal Server Error")
		return
	}
	switch t {
	case treeOpenStack:
		s.serveOpenStack(req)
	case treeGCE:
		s.serveGCE(req)
	default:
		s.serveEC2(req)
	}
}

// requestTime is when the request arrived: fasthttp's reading of the
// clock, unless a test set its own clock.
func (s *Server) requestTime(req *request) time.Time {
	if s.fakeClock {
		return s.opts.Now()
	}
	return req.ctx.Time()
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
	gce := gceTree(inst)
	return &rendered{ec2: ec2, openstack: os, gce: gce, ec2Paths: indexTree(ec2), openstackPaths: indexTree(os), gcePaths: indexTree(gce)}, nil
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

// writeBody is the one place that answers: the status, the content type
// and the body, which fasthttp sends with its length (and leaves out, the
// length kept, for HEAD). Bodies are rendered once per tree and never
// changed after, so they are handed over without a copy.
func writeBody(req *request, code int, contentType string, body []byte) {
	req.code = code
	req.ctx.SetStatusCode(code)
	req.ctx.SetContentType(contentType)
	req.ctx.Response.SetBodyRaw(body)
}

func writeText(req *request, code int, msg string) {
	writeBody(req, code, "text/plain; charset=utf-8", []byte(msg))
}

func notFound(req *request) { writeText(req, fasthttp.StatusNotFound, "Not Found") }

func methodNotAllowed(req *request, allow string) {
	req.ctx.Response.Header.Set("Allow", allow)
	writeText(req, fasthttp.StatusMethodNotAllowed, "Method Not Allowed")
}

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
	writeBody(req, fasthttp.StatusOK, ct, n.body)
}
