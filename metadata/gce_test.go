package metadata

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

var google = map[string]string{"Metadata-Flavor": "Google"}

func TestGCEHeaderRules(t *testing.T) {
	e := newTestEnv(t, nil)
	got := e.get(2, "/computeMetadata/v1/instance/id")
	if got.code != 403 || got.header.Get("Metadata-Flavor") != "Google" {
		t.Errorf("without Metadata-Flavor: %d flavor=%q, want 403 Google", got.code, got.header.Get("Metadata-Flavor"))
	}
	if got := e.do(2, "GET", "/computeMetadata/v1/instance/id", map[string]string{"Metadata-Flavor": "google"}); got.code != 403 {
		t.Errorf("wrong flavor value: %d, want 403", got.code)
	}
	if got := e.do(2, "GET", "/computeMetadata/v1/instance/id", map[string]string{"Metadata-Flavor": "Google", "X-Forwarded-For": "192.0.2.7"}); got.code != 403 {
		t.Errorf("with X-Forwarded-For: %d, want 403", got.code)
	}
	if got := e.do(2, "POST", "/computeMetadata/v1/instance/id", google); got.code != 405 {
		t.Errorf("POST: %d, want 405", got.code)
	}
	got = e.do(2, "GET", "/computeMetadata/v1/instance/id", map[string]string{"X-Google-Metadata-Request": "True"})
	if got.code != 200 || got.body != idA {
		t.Errorf("legacy header: %d %q", got.code, got.body)
	}
}

func TestGCETree(t *testing.T) {
	e := newTestEnv(t, nil)
	tests := []struct {
		from int
		path string
		code int
		body string
	}{
		{2, "/computeMetadata/v1/instance/id", 200, idA},
		{3, "/computeMetadata/v1/instance/id", 200, idB},
		{2, "/computeMetadata/v1/instance/hostname", 200, "web1.minicloud.internal"},
		{2, "/computeMetadata/v1/instance/name", 200, "web1"},
		{2, "/computeMetadata/v1/instance/zone", 200, "projects/proj1/zones/zone-a"},
		{2, "/computeMetadata/v1/instance/machine-type", 200, "projects/proj1/machineTypes/small"},
		{2, "/computeMetadata/v1/instance/network-interfaces/", 200, "0/\n"},
		{2, "/computeMetadata/v1/instance/network-interfaces/0/ip", 200, "10.0.0.5"},
		{2, "/computeMetadata/v1/instance/network-interfaces/0/mac", 200, "52:54:00:00:00:0a"},
		{2, "/computeMetadata/v1/instance/network-interfaces/0/gateway", 200, "10.0.0.1"},
		{2, "/computeMetadata/v1/instance/network-interfaces/0/subnetmask", 200, "255.255.255.0"},
		{2, "/computeMetadata/v1/instance/network-interfaces/0/network", 200, "projects/proj1/networks/default"},
		{2, "/computeMetadata/v1/instance/tags", 200, `["http-server"]`},
		{2, "/computeMetadata/v1/instance/attributes/", 200, "role\nssh-keys\nuser-data\n"},
		{2, "/computeMetadata/v1/instance/attributes/user-data", 200, "#cloud-config\nhostname: web1\n"},
		{3, "/computeMetadata/v1/instance/attributes/user-data", 404, ""},
		{2, "/computeMetadata/v1/project/project-id", 200, "proj1"},
		{2, "/computeMetadata/v1/", 200, "instance/\nproject/\n"},
		{2, "/computeMetadata/v1/instance/id?alt=json", 200, `"` + idA + `"`},
		{2, "/computeMetadata/v1/instance/nope", 404, ""},
		{2, "/computeMetadata/v1/instance/id?alt=xml", 400, ""},
		{2, "/computeMetadata/v1/instance/attributes", 301, ""},
		{2, "/computeMetadata/v1/project/attributes/?recursive=True", 200, "{}"},
	}
	for _, tc := range tests {
		got := e.do(tc.from, "GET", tc.path, google)
		if got.code != tc.code || (tc.body != "" && got.body != tc.body) {
			t.Errorf("GET %s = %d %q, want %d %q", tc.path, got.code, got.body, tc.code, tc.body)
		}
		if got.header.Get("Metadata-Flavor") != "Google" {
			t.Errorf("GET %s: no Metadata-Flavor: Google in the answer", tc.path)
		}
	}

	// cloud-init reads instance/attributes/?recursive=True as JSON.
	got := e.do(2, "GET", "/computeMetadata/v1/instance/attributes/?recursive=True", google)
	var attrs map[string]string
	if err := json.Unmarshal([]byte(got.body), &attrs); err != nil {
		t.Fatalf("recursive attributes: %v %q", err, got.body)
	}
	if attrs["user-data"] != "#cloud-config\nhostname: web1\n" || !strings.HasPrefix(attrs["ssh-keys"], "cloudinit:ssh-ed25519 ") {
		t.Errorf("attributes = %v", attrs)
	}

	got = e.do(2, "GET", "/computeMetadata/v1/instance/?recursive=true", google)
	var inst struct {
		ID                string `json:"id"`
		MachineType       string `json:"machineType"`
		NetworkInterfaces []struct {
			IP  string `json:"ip"`
			MAC string `json:"mac"`
			MTU int    `json:"mtu"`
		} `json:"networkInterfaces"`
		Tags []string `json:"tags"`
	}
	if err := json.Unmarshal([]byte(got.body), &inst); err != nil {
		t.Fatalf("recursive instance: %v", err)
	}
	if inst.ID != idA || inst.MachineType == "" || len(inst.NetworkInterfaces) != 1 || inst.NetworkInterfaces[0].IP != "10.0.0.5" ||
		inst.NetworkInterfaces[0].MTU != 1450 || len(inst.Tags) != 1 {
		t.Errorf("recursive instance = %+v", inst)
	}

	got = e.do(2, "GET", "/computeMetadata/v1/instance/network-interfaces/?recursive=true&alt=text", google)
	if !strings.Contains(got.body, "0/ip 10.0.0.5\n") || !strings.Contains(got.body, "0/mac 52:54:00:00:00:0a\n") {
		t.Errorf("alt=text recursive = %q", got.body)
	}
}

func TestGCEWaitForChange(t *testing.T) {
	e := newTestEnv(t, nil)
	path := "/computeMetadata/v1/instance/attributes/role"
	first := e.do(2, "GET", path, google)
	etag := first.header.Get("ETag")
	if first.body != "web" || etag == "" {
		t.Fatalf("first: %q etag %q", first.body, etag)
	}
	// A stale last_etag answers at once.
	if got := e.do(2, "GET", path+"?wait_for_change=true&last_etag=0000", google); got.body != "web" || got.header.Get("ETag") != etag {
		t.Errorf("stale etag: %q %q", got.body, got.header.Get("ETag"))
	}
	// A timeout answers with the unchanged value.
	if got := e.do(2, "GET", path+"?wait_for_change=true&timeout_sec=1&last_etag="+etag, google); got.code != 200 || got.header.Get("ETag") != etag {
		t.Errorf("timeout: %d %q", got.code, got.header.Get("ETag"))
	}

	type answer struct {
		res result
		err error
	}
	done := make(chan answer, 1)
	go func() {
		req, _ := http.NewRequest("GET", e.base+path+"?wait_for_change=true&timeout_sec=60&last_etag="+etag, nil)
		req.Header.Set("Metadata-Flavor", "Google")
		resp, err := client(2).Do(req)
		if err != nil {
			done <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		var b strings.Builder
		_, err = ioCopy(&b, resp)
		done <- answer{res: result{code: resp.StatusCode, body: b.String(), header: resp.Header}, err: err}
	}()
	waitForWaiters(t, e, 1)

	// Changing another instance, or re-setting A unchanged, wakes nothing
	// that answers: only a change of A's value ends the wait.
	b, _ := e.dir.Get(idB)
	b2 := *b
	b2.Attributes = map[string]string{"role": "db"}
	if err := e.dir.Upsert(&b2); err != nil {
		t.Fatal(err)
	}
	a, _ := e.dir.Get(idA)
	a2 := *a
	a2.Attributes = map[string]string{"role": "api"}
	if err := e.dir.Upsert(&a2); err != nil {
		t.Fatal(err)
	}
	select {
	case ans := <-done:
		if ans.err != nil || ans.res.body != "api" || ans.res.header.Get("ETag") == etag {
			t.Fatalf("after change: %+v", ans)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("wait_for_change did not return after the instance changed")
	}
}

// waitForWaiters blocks until n long-polls are parked in the server.
func waitForWaiters(t *testing.T, e *testEnv, n float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for gaugeValue(e.srv.metrics.longPollWaiters) < n {
		if time.Now().After(deadline) {
			t.Fatalf("no long-poll parked after 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestGCEAnswersFollowChanges: answers are rendered once per tree and then
// reused, so a repeated request gets the same bytes and ETag, and a changed
// instance (a new tree) gets new ones, a recursive wait_for_change included.
func TestGCEAnswersFollowChanges(t *testing.T) {
	e := newTestEnv(t, nil)
	const path = "/computeMetadata/v1/instance/attributes/?recursive=true"
	first := e.do(2, "GET", path, google)
	again := e.do(2, "GET", path, google)
	if first.code != 200 || !strings.Contains(first.body, `"role":"web"`) || strings.Contains(first.body, "tier") || again.body != first.body || again.header.Get("ETag") != first.header.Get("ETag") {
		t.Fatalf("repeated recursive answer: %+v then %+v", first, again)
	}
	if cl := first.header.Get("Content-Length"); cl != strconv.Itoa(len(first.body)) || first.header.Get("Content-Type") != "application/json" {
		t.Errorf("headers: %v", first.header)
	}

	done := make(chan result, 1)
	go func() { done <- e.do(2, "GET", path+"&wait_for_change=true&timeout_sec=60", google) }()
	waitForWaiters(t, e, 1)
	a, _ := e.dir.Get(idA)
	a2 := *a
	a2.Attributes = map[string]string{"role": "web", "tier": "front"}
	if err := e.dir.Upsert(&a2); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-done:
		if !strings.Contains(got.body, `"tier":"front"`) || got.header.Get("ETag") == first.header.Get("ETag") || got.header.Get("Content-Length") != strconv.Itoa(len(got.body)) {
			t.Fatalf("after change: %+v", got)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("recursive wait_for_change did not return after the instance changed")
	}
	if got := e.do(2, "GET", path, google); !strings.Contains(got.body, `"tier":"front"`) {
		t.Errorf("plain GET after change: %q", got.body)
	}
}
