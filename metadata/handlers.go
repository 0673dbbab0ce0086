package metadata

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"github.com/valyala/fasthttp"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// serveEC2 answers "/" and "/<version>/...", enforcing IMDSv2.
func (s *Server) serveEC2(req *request) {
	p := strings.TrimPrefix(req.path, "/")
	version, rest, _ := strings.Cut(p, "/")
	knownVersion := ec2VersionSet[version]
	// The indexed paths are valid ones; any other path is checked as
	// before, so a malformed one is a 404 whatever the method or token.
	var n *node
	if knownVersion {
		n = req.trees.ec2Paths[rest]
	}
	if n == nil {
		var buf [maxInlineSegs]string
		if _, ok := splitPathInto(req.path, buf[:0]); !ok {
			notFound(req)
			return
		}
	}
	if knownVersion && rest == "api/token" {
		if !req.ctx.IsPut() {
			methodNotAllowed(req, fasthttp.MethodPut)
			return
		}
		s.issueToken(req)
		return
	}
	if !req.isRead() {
		methodNotAllowed(req, "GET, HEAD")
		return
	}
	// A token, when sent, must be valid for this very VM, whatever the
	// VM's setting; without one, only VMs that allow IMDSv1 are answered.
	if tok := req.header(tokenHeader); len(tok) > 0 {
		if !s.tokens.valid(string(tok), req.entry.inst.ID, s.opts.Now()) {
			writeText(req, fasthttp.StatusUnauthorized, "Unauthorized")
			return
		}
	} else if req.entry.inst.TokensRequired {
		writeText(req, fasthttp.StatusUnauthorized, "Unauthorized")
		return
	}
	if p == "" {
		writeBody(req, fasthttp.StatusOK, "text/plain", ec2VersionListing)
		return
	}
	if !knownVersion {
		notFound(req)
		return
	}
	writeNode(req, n)
}

// issueToken answers PUT /latest/api/token with AWS's SSRF defences: no
// forwarded requests, a bounded TTL, and a response that cannot be routed
// beyond the guest (IP TTL 1, connection closed after it).
func (s *Server) issueToken(req *request) {
	if req.hasHeader("X-Forwarded-For") {
		writeText(req, fasthttp.StatusForbidden, "Forbidden")
		return
	}
	ttl, err := parseTTL(string(req.header(tokenTTLHeader)))
	if err != nil {
		writeText(req, fasthttp.StatusBadRequest, "Bad Request: "+err.Error())
		return
	}
	if err := setIPTTL(req.pc.Conn, 1); err != nil {
		// Never hand out a token that might travel further than the guest.
		s.log.Error("refusing IMDSv2 token", "instance", req.entry.inst.ID, "err", err)
		writeText(req, fasthttp.StatusInternalServerError, "Internal Server Error")
		return
	}
	tok := s.tokens.mint(req.entry.inst.ID, s.opts.Now(), ttl)
	s.metrics.tokensIssued.Inc()
	req.ctx.Response.Header.Set(tokenTTLHeader, strconv.Itoa(int(ttl/time.Second)))
	// The socket keeps TTL 1 until it closes: no later response on it.
	req.ctx.SetConnectionClose()
	writeBody(req, fasthttp.StatusOK, "text/plain", []byte(tok))
}

// serveOpenStack answers /openstack and /openstack/<version>/<file>.
func (s *Server) serveOpenStack(req *request) {
	if !req.isRead() {
		methodNotAllowed(req, "GET, HEAD")
		return
	}
	p := strings.TrimPrefix(strings.TrimPrefix(req.path, "/openstack"), "/")
	writeNode(req, req.trees.openstackPaths[p])
}

const (
	gceRoot     = "/computeMetadata"
	gcePrefixV1 = "/computeMetadata/v1"
)

// serveGCE answers /computeMetadata/v1/... with GCE's header rules,
// recursive/alt rendering, ETags and wait_for_change long-polls.
func (s *Server) serveGCE(req *request) {
	req.ctx.Response.Header.Set("Metadata-Flavor", "Google")
	if string(req.header("Metadata-Flavor")) != "Google" && string(req.header("X-Google-Metadata-Request")) != "True" {
		writeText(req, fasthttp.StatusForbidden, "Missing Metadata-Flavor:Google header.")
		return
	}
	if req.hasHeader("X-Forwarded-For") {
		writeText(req, fasthttp.StatusForbidden, "Forbidden")
		return
	}
	if !req.isRead() {
		methodNotAllowed(req, "GET, HEAD")
		return
	}
	switch req.path {
	case gceRoot, gceRoot + "/":
		writeBody(req, fasthttp.StatusOK, "application/text", []byte("v1/\n"))
		return
	case gcePrefixV1:
		redirectSlash(req)
		return
	}
	if !strings.HasPrefix(req.path, gcePrefixV1+"/") {
		notFound(req)
		return
	}
	// rel is the path below /computeMetadata/v1/: the tree's index key.
	rel := strings.TrimPrefix(req.path, gcePrefixV1+"/")
	n := req.trees.gcePaths[rel]
	if n == nil {
		// Not a path of the tree: a malformed one is a 404 before the
		// query is looked at, as before the index.
		var buf [maxInlineSegs]string
		if _, ok := splitPathInto(strings.TrimPrefix(req.path, gcePrefixV1), buf[:0]); !ok {
			notFound(req)
			return
		}
	}
	if n != nil && n.dynamic {
		s.serveIdentity(req)
		return
	}
	var q url.Values // most requests have no query: nothing to parse
	if req.query != "" {
		q = req.queryValues()
	}
	recursive := boolParam(q, "recursive")
	alt := q.Get("alt")
	if alt != "" && alt != "json" && alt != "text" {
		writeText(req, fasthttp.StatusBadRequest, "alt must be json or text")
		return
	}
	wait := boolParam(q, "wait_for_change")
	if !wait {
		s.writeGCE(req, rel, recursive, alt)
		return
	}
	timeout := s.opts.MaxLongPoll
	if t := q.Get("timeout_sec"); t != "" {
		n, err := strconv.Atoi(t)
		if err != nil || n < 1 {
			writeText(req, fasthttp.StatusBadRequest, "timeout_sec must be a positive integer")
			return
		}
		if d := time.Duration(n) * time.Second; d < timeout {
			timeout = d
		}
	}
	s.waitGCE(req, rel, recursive, alt, q.Get("last_etag"), timeout)
}

// boolParam is a true/false query parameter, false when absent or not a
// boolean (parsing an absent one would allocate its error).
func boolParam(q url.Values, name string) bool {
	v := q.Get(name)
	if v == "" {
		return false
	}
	b, _ := strconv.ParseBool(v)
	return b
}

func redirectSlash(req *request) {
	u := url.URL{Path: req.path + "/", RawQuery: req.query}
	req.ctx.Response.Header.Set("Location", u.RequestURI())
	writeText(req, fasthttp.StatusMovedPermanently, "Moved Permanently")
}

// renderGCE finds one GCE answer for rel, a path below the v1 root (see
// serveGCE); code is 0 on success.
func renderGCE(r *rendered, rel string, recursive bool, alt string) (*gceAnswer, int) {
	n := r.gcePaths[rel]
	if n == nil {
		return nil, fasthttp.StatusNotFound
	}
	trailing := strings.HasSuffix(rel, "/")
	var k gceKind
	switch {
	case n.dir && recursive && alt != "text":
		k = gceRecursiveJSON
	case n.dir && recursive:
		k = gceRecursiveText
	case n.dir && !trailing && rel != "":
		return nil, fasthttp.StatusMovedPermanently
	case n.dir && alt == "json":
		k = gceListingJSON
	case n.dir:
		k = gceListing
	case alt == "json" || recursive:
		k = gceLeafJSON
	default:
		k = gceLeaf
	}
	ans, err := n.answer(k)
	if err != nil {
		return nil, fasthttp.StatusInternalServerError
	}
	return ans, 0
}

// gceKind is which form of a node an answer is.
type gceKind uint8

const (
	gceRecursiveJSON gceKind = iota
	gceRecursiveText
	gceListingJSON
	gceListing
	gceLeafJSON
	gceLeaf
	numGCEKinds
)

// gceAnswer is one rendered GCE answer with its header values. A node
// keeps its answers: a tree belongs to one version of an instance (the
// Directory gives a changed instance a new entry, hence new trees), so
// nothing cached here outlives the data it was rendered from.
type gceAnswer struct {
	body              []byte
	contentType, etag string
}

// answer is n's answer of kind k, rendered on first use. Two requests
// racing render the same bytes; either may be kept.
func (n *gnode) answer(k gceKind) (*gceAnswer, error) {
	if a := n.answers[k].Load(); a != nil {
		return a, nil
	}
	body, ct, err := n.render(k)
	if err != nil {
		return nil, err
	}
	a := &gceAnswer{body: body, contentType: ct, etag: gceETag(body)}
	n.answers[k].Store(a)
	return a, nil
}

func (n *gnode) render(k gceKind) (body []byte, contentType string, err error) {
	switch k {
	case gceRecursiveJSON:
		b, err := json.Marshal(n.jsonValue())
		return b, "application/json", err
	case gceRecursiveText:
		var buf bytes.Buffer
		n.flatText("", &buf)
		return buf.Bytes(), "application/text", nil
	case gceListingJSON:
		names := make([]string, 0, len(n.order))
		for _, name := range n.order {
			if n.children[name].dir {
				name += "/"
			}
			names = append(names, name)
		}
		b, err := json.Marshal(names)
		return b, "application/json", err
	case gceListing:
		return n.listing, "application/text", nil
	case gceLeafJSON:
		b, err := json.Marshal(n.value)
		return b, "application/json", err
	default:
		return n.text, "application/text", nil
	}
}

func gceETag(body []byte) string {
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:8])
}

func (s *Server) writeGCE(req *request, rel string, recursive bool, alt string) {
	ans, code := renderGCE(req.trees, rel, recursive, alt)
	switch code {
	case 0:
	case fasthttp.StatusMovedPermanently:
		redirectSlash(req)
		return
	case fasthttp.StatusNotFound:
		notFound(req)
		return
	default:
		writeText(req, code, fasthttp.StatusMessage(code))
		return
	}
	req.ctx.Response.Header.Set("ETag", ans.etag)
	writeBody(req, fasthttp.StatusOK, ans.contentType, ans.body)
}

// waitGCE holds the request until the answer's ETag differs from lastETag
// (or, without one, from the answer now), the timeout passes or the client
// goes away. The Directory closes an entry's channel when the instance
// changes, so nothing polls.
func (s *Server) waitGCE(req *request, rel string, recursive bool, alt, lastETag string, timeout time.Duration) {
	done, ok := s.startWait(req.entry.inst.ID)
	if !ok {
		writeText(req, fasthttp.StatusTooManyRequests, "too many wait_for_change requests waiting: close some")
		return
	}
	defer done()
	req.longPoll = true
	s.metrics.longPollWaiters.Inc()
	defer s.metrics.longPollWaiters.Dec()
	gone := watchHangup(req.pc)
	defer gone.stop()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		ans, code := renderGCE(req.trees, rel, recursive, alt)
		if code != 0 {
			s.writeGCE(req, rel, recursive, alt)
			return
		}
		etag := ans.etag
		if lastETag == "" {
			lastETag = etag
		}
		if etag != lastETag {
			s.writeGCE(req, rel, recursive, alt)
			return
		}
		select {
		case <-req.entry.changed:
			// Re-identify: the instance may have lost this address.
			e, err := s.dir.identify(req.peer, req.mac)
			if err != nil {
				notFound(req)
				return
			}
			if err := s.use(req, e); err != nil {
				writeText(req, fasthttp.StatusInternalServerError, "Internal Server Error")
				return
			}
		case <-timer.C:
			s.writeGCE(req, rel, recursive, alt)
			return
		case <-gone.c:
			return
		case <-s.baseCtx.Done():
			return
		}
	}
}
