package metadata

import (
	"strconv"
	"testing"
)

// TestResponseHeaders: the header values made once per rendered node stay
// true for every request (GET and HEAD alike), and a changed instance gets
// the headers of its new bodies, not the old version's.
func TestResponseHeaders(t *testing.T) {
	e := newTestEnv(t, nil)
	check := func(path, wantType, wantBody string) {
		t.Helper()
		for i := 0; i < 2; i++ { // the second answer comes from the made headers
			got := e.get(2, path)
			if got.code != 200 || (wantBody != "" && got.body != wantBody) {
				t.Fatalf("GET %s = %d %q, want 200 %q", path, got.code, got.body, wantBody)
			}
			if ct := got.header.Get("Content-Type"); ct != wantType {
				t.Errorf("GET %s: Content-Type %q, want %q", path, ct, wantType)
			}
			if cl := got.header.Get("Content-Length"); cl != strconv.Itoa(len(got.body)) {
				t.Errorf("GET %s: Content-Length %q for a %d-byte body", path, cl, len(got.body))
			}
			head := e.do(2, "HEAD", path, nil)
			if head.body != "" || head.header.Get("Content-Length") != strconv.Itoa(len(got.body)) {
				t.Errorf("HEAD %s = %q with Content-Length %q, want no body and %d", path, head.body, head.header.Get("Content-Length"), len(got.body))
			}
		}
	}
	check("/latest/meta-data/instance-id", "text/plain", idA)
	check("/latest/meta-data/", "text/plain", "")
	check("/latest/user-data", "application/octet-stream", "#cloud-config\nhostname: web1\n")
	check("/openstack/latest/meta_data.json", "application/json", "")

	a2 := *testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	a2.UserData = []byte("#cloud-config\nhostname: web1-renamed-with-a-longer-name\n")
	if err := e.dir.Upsert(&a2); err != nil {
		t.Fatal(err)
	}
	check("/latest/user-data", "application/octet-stream", "#cloud-config\nhostname: web1-renamed-with-a-longer-name\n")

	nf := e.get(2, "/latest/meta-data/no-such-key")
	if nf.code != 404 || nf.header.Get("Content-Length") != strconv.Itoa(len(nf.body)) || nf.header.Get("Content-Type") != "text/plain; charset=utf-8" {
		t.Errorf("404 answer: %d %q %v", nf.code, nf.body, nf.header)
	}
}

// TestRequestMetrics: the counters and histograms resolved once count
// every request under its tree and status, the refused ones included.
func TestRequestMetrics(t *testing.T) {
	e := newTestEnv(t, nil)
	e.expect(2, "/latest/meta-data/instance-id", 200, idA)
	e.expect(2, "/latest/meta-data/instance-id", 200, idA)
	e.expect(2, "/latest/meta-data/nothing", 404, "")
	e.expect(2, "/openstack/latest/meta_data.json", 200, "")
	e.expect(9, "/openstack/latest/meta_data.json", 404, "") // unknown source
	e.expect(2, "/computeMetadata/v1/instance/id", 403, "")  // no Metadata-Flavor
	m := e.srv.metrics
	for _, c := range []struct {
		tree, code string
		want       float64
	}{{"ec2", "200", 2}, {"ec2", "404", 1}, {"openstack", "200", 1}, {"openstack", "404", 1}, {"gce", "403", 1}} {
		if got := counterValue(m.requests.WithLabelValues(c.tree, c.code)); got != c.want {
			t.Errorf("requests{tree=%s,code=%s} = %v, want %v", c.tree, c.code, got, c.want)
		}
	}
	for tree, want := range map[string]uint64{"ec2": 3, "openstack": 2, "gce": 1} {
		if got := histogramCount(m.latency.WithLabelValues(tree)); got != want {
			t.Errorf("latency{tree=%s} count = %d, want %d", tree, got, want)
		}
	}
}
