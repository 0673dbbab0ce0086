package metadata

import (
	"testing"
)

// TestPathIndexMatchesWalk: for every path of the EC2, OpenStack and GCE
// trees and for malformed neighbours of each (doubled, dot and trailing
// slashes, control bytes), the index answers what splitting and walking
// the path answer, so serving from it changes no response.
func TestPathIndexMatchesWalk(t *testing.T) {
	inst := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	inst.UserData = []byte("#cloud-config\n")
	r, err := render(inst, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkIndex(t, "ec2", r.ec2, r.ec2Paths)
	checkIndex(t, "openstack", r.openstack, r.openstackPaths)
	checkIndex(t, "gce", r.gce, r.gcePaths)
}

func checkIndex[N treeNode[N]](t *testing.T, name string, root N, idx pathIndex[N]) {
	t.Helper()
	var paths []string
	var collect func(prefix string, n N)
	collect = func(prefix string, n N) {
		n.eachChild(func(child string, c N) {
			paths = append(paths, prefix+child)
			collect(prefix+child+"/", c)
		})
	}
	collect("", root)
	if len(paths) < 5 {
		t.Fatalf("%s: only %d paths: the tree did not render", name, len(paths))
	}
	candidates := []string{"", "/", "//", ".", "..", "x", "x/"}
	for _, p := range paths {
		candidates = append(candidates, p, p+"/", p+"//", "/"+p, p+"/.", p+"/..", "./"+p, p+"\x00", p+"/x", p+"/x/")
	}
	var none N
	for _, p := range candidates {
		want := none
		// Handlers look up the path with its one leading slash cut, which
		// splitPath cuts too.
		if segs, ok := splitPath("/" + p); ok {
			want = walkTree(root, segs)
		}
		if got := idx[p]; got != want {
			t.Errorf("%s %q: index has %v, walk %v", name, p, got, want)
		}
	}
}
