package metadata

import (
	"crypto"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

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
