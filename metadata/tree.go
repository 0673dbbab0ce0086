package metadata

import (
	"strings"
)

// node is one path of a rendered metadata tree: a leaf with a body, or a
// directory whose listing is precomputed. Trees are rendered once per
// instance version and then only read, so lookups allocate nothing.
type node struct {
	body        []byte // leaf body, or the directory listing
	contentType string
	dir         bool
	children    map[string]*node
}

func leaf(body []byte, contentType string) *node {
	return &node{body: body, contentType: contentType}
}

func textLeaf(s string) *node { return leaf([]byte(s), "text/plain") }

func newDir() *node { return &node{dir: true, children: map[string]*node{}} }

// dirBuilder assembles a directory in listing order.
type dirBuilder struct {
	n     *node
	lines []string
}

func buildDir() *dirBuilder { return &dirBuilder{n: newDir()} }

// add lists name (with a trailing slash for directories) and serves child
// under it.
func (b *dirBuilder) add(name string, child *node) *dirBuilder {
	listed := name
	if child.dir {
		listed += "/"
	}
	return b.addListed(name, listed, child)
}

// addListed serves child under name but lists it as listed: EC2 lists
// public keys as "0=name" while serving them under "0/".
func (b *dirBuilder) addListed(name, listed string, child *node) *dirBuilder {
	b.n.children[name] = child
	b.lines = append(b.lines, listed)
	return b
}

// done finishes the directory with EC2's listing format: one entry per line,
// no trailing newline.
func (b *dirBuilder) done() *node { return b.doneWith("") }

// doneWith ends the listing with suffix (GCE ends every line with "\n").
func (b *dirBuilder) doneWith(suffix string) *node {
	b.n.body = []byte(strings.Join(b.lines, "\n") + suffix)
	if len(b.lines) == 0 {
		b.n.body = nil
	}
	b.n.contentType = "text/plain"
	return b.n
}

// pathIndex maps every path a tree answers, relative to its root and
// without the leading slash, to its node: "" is the root, and a directory
// is there both without and with its trailing slash. A request is then one
// map look-up (of the path's bytes, which Go does without a copy) instead
// of a split and a look-up per segment. Only paths that splitPath accepts
// and walk resolves to the same node are keys, so a miss is a 404 exactly
// when the walk's would be.
type pathIndex[N comparable] map[string]N

// treeNode is what the trees (EC2 and OpenStack's node, GCE's gnode) have
// in common for walking and indexing.
type treeNode[N any] interface {
	comparable
	isDir() bool
	child(string) N
	eachChild(func(name string, c N))
}

func indexTree[N treeNode[N]](root N) pathIndex[N] {
	idx := pathIndex[N]{"": root}
	var add func(prefix string, n N)
	add = func(prefix string, n N) {
		n.eachChild(func(name string, c N) {
			p := prefix + name
			keys := []string{p}
			if c.isDir() {
				keys = append(keys, p+"/")
			}
			for _, k := range keys {
				if segs, ok := splitPath("/" + k); ok && walkTree(root, segs) == c {
					idx[k] = c
				}
			}
			if c.isDir() {
				add(p+"/", c)
			}
		})
	}
	add("", root)
	return idx
}

func (n *node) isDir() bool { return n.dir }

func (n *node) child(name string) *node { return n.children[name] }

func (n *node) eachChild(f func(string, *node)) {
	for name, c := range n.children {
		f(name, c)
	}
}

// walkTree resolves segs below root in any of the trees. A trailing empty
// segment (a path ending in "/") is only allowed on directories.
func walkTree[N treeNode[N]](root N, segs []string) N {
	var none N
	cur := root
	for i, s := range segs {
		if !cur.isDir() {
			return none
		}
		if s == "" && i == len(segs)-1 {
			return cur
		}
		if cur = cur.child(s); cur == none {
			return none
		}
	}
	return cur
}

// splitPath splits a request path below a tree root into segments and
// rejects anything a well-behaved client never sends: empty inner segments,
// dot segments, control bytes and overlong paths.
func splitPath(p string) ([]string, bool) { return splitPathInto(p, nil) }

// splitPathInto is splitPath appending to segs: handlers pass an array on
// their stack, so the common path costs no allocation.
func splitPathInto(p string, segs []string) ([]string, bool) {
	if len(p) > maxPathLen {
		return nil, false
	}
	p = strings.TrimPrefix(p, "/")
	if p == "" {
		return nil, true
	}
	for {
		s, rest, more := strings.Cut(p, "/")
		if s == "" && more {
			return nil, false
		}
		if s == "." || s == ".." {
			return nil, false
		}
		for j := 0; j < len(s); j++ {
			if c := s[j]; c < 0x21 || c == 0x7f {
				return nil, false
			}
		}
		segs = append(segs, s)
		if !more {
			return segs, true
		}
		p = rest
	}
}

// maxInlineSegs is how many segments a handler's stack array holds; deeper
// paths (none of the trees has one) spill to the heap.
const maxInlineSegs = 8

const maxPathLen = 1024
