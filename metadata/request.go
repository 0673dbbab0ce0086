package metadata

import (
	"crypto"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
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
	w     http.ResponseWriter
	r     *http.Request
	pc    *peerConn
	peer  Peer
	mac   net.HardwareAddr
	entry *entry
	trees *rendered
	// guest is the VM's limiter and last-seen time, once identified.
	guest *guestState
	// code is the status written (by writeBody, the one place that
	// writes), for the metrics.
	code int
	// longPoll marks GCE waits so their duration stays out of the latency
	// histogram.
	longPoll bool
}

// ServeHTTP identifies the guest, rate-limits it and dispatches to the tree.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	// No metadata request needs a body; never buffer more than a token.
	// net/http gives requests without one http.NoBody, which reads
	// nothing: only real bodies are worth a limiting reader.
	if r.Body != http.NoBody {
		r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
	}
	t := treeOf(r.URL.Path)
	req := &request{w: w, r: r}
	s.serve(req, t)
	if req.code == 0 {
		// Nothing written (the client left a long-poll): net/http
		// answers 200 for a handler that returns silently.
		req.code = http.StatusOK
	}
	s.metrics.observe(t, req.code, time.Since(start), req.longPoll)
}

func (s *Server) serve(req *request, t tree) {
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
	g, ok := s.allow(e.inst.ID)
	if !ok {
		writeText(req, http.StatusTooManyRequests, "Too Many Requests")
		return
	}
	req.guest = g
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
	s.markSeen(g, e.inst.ID)
	if err := s.use(req, e); err != nil {
		s.log.Error("render metadata", "instance", e.inst.ID, "err", err)
		writeText(req, http.StatusInternalServerError, "Internal Server Error")
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
	writeBodyHeaders(req, code, headerValue(contentType), headerValue(strconv.Itoa(len(body))), body)
}

// writeBodyHeaders writes with header values made ahead (a rendered
// node's): assigned to the map as they are, with no canonicalising and no
// allocation. Canonical keys and one-element slices with no spare capacity
// keep them safe to share: net/http copies the header map before sending,
// and an Add elsewhere would append to a new slice, never into these.
func writeBodyHeaders(req *request, code int, contentType, contentLength []string, body []byte) {
	h := req.w.Header()
	h["Content-Type"] = contentType
	h["Content-Length"] = contentLength
	req.code = code
	req.w.WriteHeader(code)
	if req.r.Method != http.MethodHead {
		_, _ = req.w.Write(body)
	}
}

// headerValue is v as a header map value that may be shared.
func headerValue(v string) []string { return []string{v}[:1:1] }

// Content types the trees serve, as shareable header values.
var (
	ctTextPlain   = headerValue("text/plain")
	ctTextUTF8    = headerValue("text/plain; charset=utf-8")
	ctOctetStream = headerValue("application/octet-stream")
	ctJSON        = headerValue("application/json")
	ctAppText     = headerValue("application/text")
)

// contentTypeValue shares the header value of the common content types.
func contentTypeValue(ct string) []string {
	for _, v := range [][]string{ctTextPlain, ctTextUTF8, ctOctetStream, ctJSON, ctAppText} {
		if v[0] == ct {
			return v
		}
	}
	return headerValue(ct)
}

func writeText(req *request, code int, msg string) {
	writeBodyHeaders(req, code, ctTextUTF8, headerValue(strconv.Itoa(len(msg))), []byte(msg))
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
	n.headersOnce.Do(n.makeHeaders)
	writeBodyHeaders(req, http.StatusOK, n.hdrType, n.hdrLength, n.body)
}
