package metadata

import (
	"testing"
)

// TestPathIndexMatchesWalk: for every path of the EC2 and OpenStack trees
// and for malformed neighbours of each (doubled, dot and trailing slashes,
// control bytes), the index answers what splitting and walking the path
// answer, so serving from it changes no response.
func TestPathIndexMatchesWalk(t *testing.T) {
	inst := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	inst.UserData = []byte("#cloud-config\n")
	r, err := render(inst, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, tr := range map[string]struct {
		root *node
		idx  pathIndex
	}{"ec2": {r.ec2, r.ec2Paths}, "openstack": {r.openstack, r.openstackPaths}} {
		var paths []string
		var collect func(prefix string, n *node)
		collect = func(prefix string, n *node) {
			for child, c := range n.children {
				paths = append(paths, prefix+child)
				collect(prefix+child+"/", c)
			}
		}
		collect("", tr.root)
		if len(paths) < 5 {
			t.Fatalf("%s: only %d paths: the tree did not render", name, len(paths))
		}
		candidates := []string{"", "/", "//", ".", "..", "x", "x/"}
		for _, p := range paths {
			candidates = append(candidates, p, p+"/", p+"//", "/"+p, p+"/.", p+"/..", "./"+p, p+"\x00", p+"/x", p+"/x/")
		}
		for _, p := range candidates {
			var want *node
			// Handlers look up the path with its one leading slash cut,
			// which splitPath cuts too.
			if segs, ok := splitPath("/" + p); ok {
				want = tr.root.walk(segs)
			}
			if got := tr.idx[p]; got != want {
				t.Errorf("%s %q: index has %p, walk %p", name, p, got, want)
			}
		}
	}
}
