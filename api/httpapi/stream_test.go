package httpapi_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/api/httpapi"
)

// upload creates image name from disk with POST /v1/images: the header
// and the chunks as a stream of JSON objects, as docs/api.md shows.
func (w *web) upload(t *testing.T, name string, disk []byte) reply {
	t.Helper()
	return w.do(t, w.api.AdminToken, "POST", "/v1/images", uploadBody(name, disk))
}

// uploadBody is CreateImage's stream as JSON objects, one a line.
func uploadBody(name string, disk []byte) string {
	var body bytes.Buffer
	fmt.Fprintf(&body, `{"header": {"name": %q, "diskSizeBytes": "%d"}}`+"\n", name, len(disk))
	for off := 0; off < len(disk); off += 1 << 20 {
		chunk := disk[off:min(off+1<<20, len(disk))]
		fmt.Fprintf(&body, `{"chunk": {"part": "IMAGE_PART_DISK", "data": %q}}`+"\n", base64.StdEncoding.EncodeToString(chunk))
	}
	return body.String()
}

// TestUploadBound: an upload's body is bounded by MaxUploadBytes, refused
// with 413 up front when its length says so, and cut off at the bound as
// it streams when it has none; no image is left.
func TestUploadBound(t *testing.T) {
	w := startWeb(t, httpapi.Config{MaxUploadBytes: 256 << 10})
	body := uploadBody("big", bytes.Repeat([]byte("minicloud"), (1<<20)/9))
	w.do(t, w.api.AdminToken, "POST", "/v1/images", body).want(t, http.StatusRequestEntityTooLarge, "larger than 262144 bytes")

	resp := w.send(context.Background(), t, w.api.AdminToken, "POST", "/v1/images", io.MultiReader(strings.NewReader(body)))
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Request.ContentLength > 0 {
		t.Fatalf("request has a Content-Length %d: the test needs a chunked body", resp.Request.ContentLength)
	}
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(raw), "larger than 262144 bytes") {
		t.Fatalf("streamed upload over the bound: %d %s", resp.StatusCode, raw)
	}
	w.do(t, w.api.AdminToken, "GET", "/v1/images/big", "").want(t, http.StatusNotFound, "big")
	// Under the bound, the same listener takes an upload.
	if r := w.upload(t, "small", bytes.Repeat([]byte("minicloud"), (128<<10)/9)); r.code != http.StatusOK {
		t.Fatalf("upload under the bound: %d %s", r.code, r.raw)
	}
}

// stream opens a server-streaming call and returns its lines, one JSON
// message each.
func (w *web) stream(ctx context.Context, t *testing.T, path string) *bufio.Scanner {
	t.Helper()
	resp := w.send(ctx, t, w.api.AdminToken, "GET", path, nil)
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 8<<20)
	return sc
}

// next decodes the stream's next line into v.
func next(t *testing.T, sc *bufio.Scanner, v any) {
	t.Helper()
	if !sc.Scan() {
		t.Fatalf("stream ended: %v", sc.Err())
	}
	if err := json.Unmarshal(sc.Bytes(), v); err != nil {
		t.Fatalf("stream line %q: %v", sc.Text(), err)
	}
}

type watchLine struct {
	Result struct {
		Type string
		VM   struct {
			Meta struct{ Name string }
			Spec struct{ PowerState string }
		}
	}
	Error map[string]any
}

// TestStreamsAndUploads: an image uploaded as a client stream comes back
// byte for byte from the download stream, and a watch streams the VMs and
// then their changes, one JSON object per line.
func TestStreamsAndUploads(t *testing.T) {
	w := startWeb(t, httpapi.Config{})
	admin := w.api.AdminToken
	// 2.5 MiB: three chunks, the last one short.
	disk := bytes.Repeat([]byte("minicloud"), (5<<19)/9)
	if r := w.upload(t, "pattern", disk); r.code != http.StatusOK || r.body["format"] != "IMAGE_FORMAT_RAW" {
		t.Fatalf("upload: %d %s", r.code, r.raw)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dl := w.stream(ctx, t, "/v1/images/pattern:download?part=IMAGE_PART_DISK")
	var got []byte
	for dl.Scan() {
		var line struct {
			Result struct{ Data []byte }
			Error  map[string]any
		}
		if err := json.Unmarshal(dl.Bytes(), &line); err != nil || line.Error != nil {
			t.Fatalf("download line: %v %v", err, line.Error)
		}
		got = append(got, line.Result.Data...)
	}
	if !bytes.Equal(got, disk) {
		t.Fatalf("downloaded %d bytes, uploaded %d: not the same", len(got), len(disk))
	}

	// An error before the first message is the HTTP status, with the
	// error as the one line.
	missing := w.do(t, admin, "GET", "/v1/images/nope:download?part=IMAGE_PART_DISK", "")
	if e, _ := missing.body["error"].(map[string]any); missing.code != http.StatusNotFound || !strings.Contains(fmt.Sprint(e["message"]), "nope") {
		t.Fatalf("download of a missing image: %d %s", missing.code, missing.raw)
	}

	w.createVM(t, "a", "pattern")

	watch := w.stream(ctx, t, "/v1/vms:watch")
	var ev watchLine
	next(t, watch, &ev)
	if ev.Result.Type != "WATCH_EVENT_TYPE_ADDED" || ev.Result.VM.Meta.Name != "a" {
		t.Fatalf("first watch event: %+v", ev)
	}
	w.do(t, admin, "POST", "/v1/vms/a:stop", `{}`).want(t, http.StatusOK, "")
	for ev.Result.Type != "WATCH_EVENT_TYPE_MODIFIED" {
		next(t, watch, &ev)
		if ev.Error != nil {
			t.Fatalf("watch: %v", ev.Error)
		}
	}
	if ev.Result.VM.Meta.Name != "a" || ev.Result.VM.Spec.PowerState != "POWER_STATE_STOPPED" {
		t.Fatalf("watch event after stop: %+v", ev)
	}
}

// createVM creates VM name from image with a flavor and a network of its
// own (made on the first call), over HTTP.
func (w *web) createVM(t *testing.T, name, image string) {
	t.Helper()
	admin := w.api.AdminToken
	if r := w.do(t, admin, "GET", "/v1/flavors/micro", ""); r.code == http.StatusNotFound {
		w.do(t, admin, "POST", "/v1/flavors", `{"name":"micro","vcpus":1,"memoryMib":256,"diskGib":1}`).want(t, http.StatusOK, "")
		w.do(t, admin, "POST", "/v1/networks", `{"name":"web","cidr":"10.20.0.0/24"}`).want(t, http.StatusOK, "")
	}
	w.do(t, admin, "POST", "/v1/vms", `{"name":"`+name+`","spec":{"image":"`+image+`","flavor":"micro","networks":["web"]}}`).want(t, http.StatusOK, "")
}

// TestStreamBound: the streams open through one listener are bounded
// (MaxStreams); one more is refused with 429, and the other calls still
// go through.
func TestStreamBound(t *testing.T) {
	w := startWeb(t, httpapi.Config{MaxStreams: 2})
	if r := w.upload(t, "img", bytes.Repeat([]byte{7}, 64<<10)); r.code != http.StatusOK {
		t.Fatalf("upload: %d %s", r.code, r.raw)
	}
	w.createVM(t, "a", "img")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for range 2 {
		var ev watchLine
		next(t, w.stream(ctx, t, "/v1/vms:watch"), &ev)
		if ev.Result.VM.Meta.Name != "a" {
			t.Fatalf("watch: %+v", ev)
		}
	}
	w.do(t, w.api.AdminToken, "GET", "/v1/vms:watch", "").want(t, http.StatusTooManyRequests, "2 streams")
	w.do(t, w.api.AdminToken, "GET", "/v1/images/img:download?part=IMAGE_PART_DISK", "").want(t, http.StatusTooManyRequests, "2 streams")
	w.do(t, w.api.AdminToken, "GET", "/v1/vms/a", "").want(t, http.StatusOK, "")
}

// TestRequestID: the caller's X-Request-Id is the audit record's; without
// one, the id the API made comes back as X-Request-Id.
func TestRequestID(t *testing.T) {
	w := startWeb(t, httpapi.Config{})
	create := func(name string, header ...string) string {
		resp := w.send(context.Background(), t, w.api.AdminToken, "POST", "/v1/projects", strings.NewReader(`{"name":"`+name+`"}`), header...)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST /v1/projects: %d", resp.StatusCode)
		}
		return resp.Header.Get("X-Request-Id")
	}
	create("given", "X-Request-Id", "http-req-1")
	made := create("made")
	if made == "" {
		t.Fatal("no X-Request-Id on the response of a request without one")
	}
	var audit struct {
		Records []struct{ RPC, Object, RequestID, Code string }
	}
	r := w.do(t, w.api.AdminToken, "GET", "/v1/audit-records?limit=10", "")
	if err := json.Unmarshal([]byte(r.raw), &audit); err != nil {
		t.Fatal(err)
	}
	found := map[string]string{}
	for _, rec := range audit.Records {
		if rec.RPC == "AuthService/CreateProject" && rec.Code == "OK" {
			found[rec.Object] = rec.RequestID
		}
	}
	if found["given"] != "http-req-1" || found["made"] != made {
		t.Fatalf("audit request ids %v, want given=http-req-1 made=%s: %s", found, made, r.raw)
	}
}
