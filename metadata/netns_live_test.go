package metadata

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/minicloud/minicloud/pkg/netnstest"
)

// nsGet is one GCE-style GET from a namespace guest, with the ETag.
func nsGet(t *testing.T, g *netnstest.Guest, path string) (code int, body, etag string) {
	t.Helper()
	req, err := http.NewRequest("GET", "http://169.254.169.254"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Metadata-Flavor", "Google")
	c := nsClient(g)
	c.Timeout = 2 * time.Minute
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s: GET %s: %v", g.Name, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b), resp.Header.Get("ETag")
}

// TestRealNetworkLiveMetadataIsolation runs two namespace guests on one
// bridge against the real metadata service while their labels, tags and
// custom metadata change: each sees its own, in every tree, before and
// after, and a long-poll wakes only for a change of its own answer.
func TestRealNetworkLiveMetadataIsolation(t *testing.T) {
	n := newRealNet(t)
	ga := n.guest(t, "a", "10.99.0.5")
	gb := n.guest(t, "b", "10.99.0.6")
	set := func(a, b string, aTags ...string) {
		t.Helper()
		ia := n.instanceFor(idA, "web1", ga, "10.99.0.5")
		ib := n.instanceFor(idB, "web2", gb, "10.99.0.6")
		for _, x := range []struct {
			inst   *Instance
			secret string
		}{{ia, a}, {ib, b}} {
			x.inst.Labels = map[string]string{"owner": x.secret}
			x.inst.Tags = []string{"tag-" + x.secret}
			x.inst.Attributes = map[string]string{"secret": x.secret}
		}
		if len(aTags) > 0 {
			ia.Tags = aTags
		}
		if err := n.dir.Set([]*Instance{ia, ib}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	check := func(g *netnstest.Guest, own, other string) {
		t.Helper()
		for _, path := range []string{"/latest/meta-data/tags/instance/owner", "/computeMetadata/v1/instance/attributes/secret"} {
			if code, body, _ := nsGet(t, g, path); code != 200 || body != own {
				t.Errorf("%s: %s = %d %q, want %q", g.Name, path, code, body, own)
			}
		}
		for _, path := range []string{"/computeMetadata/v1/?recursive=true", "/openstack/latest/meta_data.json", "/computeMetadata/v1/instance/tags"} {
			code, body, _ := nsGet(t, g, path)
			if code != 200 || !strings.Contains(body, own) || strings.Contains(body, other) {
				t.Errorf("%s: %s = %d %q: want %q and never %q", g.Name, path, code, body, own, other)
			}
		}
		if code, body, err := nsDo(t, nsClient(g), ctx, "GET", "/latest/meta-data/tags/instance/", nil); err != nil || code != 200 || body != "owner" {
			t.Errorf("%s: EC2 tag listing %d %q %v", g.Name, code, body, err)
		}
	}
	set("alpha-1", "bravo-1")
	check(ga, "alpha-1", "bravo-1")
	check(gb, "bravo-1", "alpha-1")

	type answer struct {
		code       int
		body, etag string
	}
	wait := func(g *netnstest.Guest, path string) <-chan answer {
		ch := make(chan answer, 1)
		go func() {
			code, body, etag := nsGet(t, g, path)
			ch <- answer{code, body, etag}
		}()
		return ch
	}
	_, _, etag := nsGet(t, ga, "/computeMetadata/v1/instance/attributes/secret")
	_, _, dirETag := nsGet(t, ga, "/computeMetadata/v1/instance/attributes/?recursive=true")
	value := wait(ga, "/computeMetadata/v1/instance/attributes/secret?wait_for_change=true&timeout_sec=120&last_etag="+etag)
	dir := wait(ga, "/computeMetadata/v1/instance/attributes/?recursive=true&wait_for_change=true&timeout_sec=120&last_etag="+dirETag)
	waitForLongPolls(t, n.srv, 2)

	// B's update and A's tag change (outside attributes/) answer no poll.
	set("alpha-1", "bravo-2", "other-tag")
	check(gb, "bravo-2", "alpha-1")
	if _, body, _ := nsGet(t, ga, "/computeMetadata/v1/instance/tags"); body != `["other-tag"]` {
		t.Errorf("A's tags after the update: %s", body)
	}
	select {
	case a := <-value:
		t.Fatalf("A's wait on its attribute answered after B's update: %+v", a)
	case a := <-dir:
		t.Fatalf("A's recursive wait on attributes/ answered after a change outside it: %+v", a)
	case <-time.After(2 * time.Second):
	}

	set("alpha-2", "bravo-2")
	for _, ch := range []<-chan answer{value, dir} {
		select {
		case a := <-ch:
			if a.code != 200 || !strings.Contains(a.body, "alpha-2") || strings.Contains(a.body, "bravo") || a.etag == etag || a.etag == dirETag {
				t.Errorf("A's wait answered %+v, want its new secret alpha-2 with a new ETag", a)
			}
		case <-time.After(time.Minute):
			t.Fatal("A's wait did not answer after A's update")
		}
	}
	check(ga, "alpha-2", "bravo")
	check(gb, "bravo-2", "alpha")
}

// waitForLongPolls blocks until n long-polls are parked in srv.
func waitForLongPolls(t *testing.T, srv *Server, n float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for gaugeValue(srv.metrics.longPollWaiters) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%v long-polls parked after 30s, want %v", gaugeValue(srv.metrics.longPollWaiters), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
