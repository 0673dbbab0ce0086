package webui_test

import (
	"bufio"
	"context"
	"fmt"
	"html"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/server/apiservertest"
	"github.com/minicloud/minicloud/api/webui"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

// console is the web console in front of a real API server (real etcd),
// an admin's API client to seed it, and a browser-like HTTP client.
type console struct {
	t     *testing.T
	api   *apiservertest.Running
	admin *client.Client
	// anon is a client without a token (withToken gives its calls one).
	anon    *client.Client
	srv     *httptest.Server
	browser *http.Client
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func start(t *testing.T) *console {
	t.Helper()
	_, cli := etcdtest.Start(t)
	api, err := apiservertest.Listen(context.Background(), cli, server.Config{ImageDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { api.Server.GRPCServer().Stop() })
	// The console's own connection carries no credentials: every call
	// carries the signed-in user's token.
	conn, err := client.NewConn(api.Addr, api.DialOptions("")...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	h, err := webui.New(webui.Config{API: client.New(conn), Insecure: true, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	adminConn, err := client.NewConn(api.Addr, api.DialOptions(api.AdminToken)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { adminConn.Close() })
	jar, _ := cookiejar.New(nil)
	c := &console{t: t, api: api, admin: client.New(adminConn), anon: client.New(conn), srv: srv, browser: &http.Client{Jar: jar}}
	c.seed()
	return c
}

// seed creates what a VM needs: a flavor, the default network, an image.
func (c *console) seed() {
	t := c.t
	if _, err := c.admin.Flavors.CreateFlavor(ctx(t), &minicloudv1.CreateFlavorRequest{Name: "tiny", Vcpus: 1, MemoryMib: 256, DiskGib: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.admin.Networks.CreateNetwork(ctx(t), &minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.99.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	up, err := c.admin.Images.CreateImage(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	up.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{Name: "tiny"}}})
	up.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: []byte("disk")}}})
	if _, err := up.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
}

// do sends a request as the browser; htmx marks it as htmx's.
func (c *console) do(method, path string, form url.Values, htmx bool) (*http.Response, string) {
	c.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx(c.t), method, c.srv.URL+path, body)
	if err != nil {
		c.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if htmx {
		req.Header.Set("HX-Request", "true")
	}
	resp, err := c.browser.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	return resp, string(b)
}

func (c *console) signIn(token string) {
	c.t.Helper()
	resp, body := c.do("POST", "/login", url.Values{"token": {token}}, false)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "<h1>Overview</h1>") {
		c.t.Fatalf("sign in: %s\n%s", resp.Status, body)
	}
}

func TestSignIn(t *testing.T) {
	c := start(t)
	// Not signed in: every page sends the browser to the login page.
	resp, body := c.do("GET", "/vms", nil, false)
	if resp.Request.URL.Path != "/login" || !strings.Contains(body, `name="token"`) {
		t.Fatalf("GET /vms without a token ended at %s:\n%s", resp.Request.URL, body)
	}
	// A wrong token is refused with the API's own message, next to the field.
	_, apiErr := c.anon.Auth.WhoAmI(withToken(ctx(t), "mct_not-a-token"), &minicloudv1.WhoAmIRequest{})
	if apiErr == nil {
		t.Fatal("the API accepted a made-up token")
	}
	resp, body = c.do("POST", "/login", url.Values{"token": {"mct_not-a-token"}}, false)
	if resp.StatusCode != http.StatusUnprocessableEntity || !strings.Contains(body, `id="err-token"`) ||
		!strings.Contains(body, html.EscapeString(apiErr.Error())) {
		t.Fatalf("bad token: %s, want the API's %q next to the field:\n%s", resp.Status, apiErr, body)
	}
	c.signIn(c.api.AdminToken)
	// The cookie is the token, kept away from scripts and other sites.
	resp, _ = c.do("POST", "/login", url.Values{"token": {c.api.AdminToken}}, false)
	var cookie *http.Cookie
	for r := resp.Request.Response; r != nil; r = r.Request.Response {
		for _, ck := range r.Cookies() {
			if ck.Name == "minicloud_token" {
				cookie = ck
			}
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict", cookie)
	}
	// Every answer carries the Content-Security-Policy.
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe") {
		t.Fatalf("CSP %q", csp)
	}
	// Signing out forgets the token.
	c.do("POST", "/logout", url.Values{}, false)
	if resp, _ := c.do("GET", "/", nil, false); resp.Request.URL.Path != "/login" {
		t.Fatalf("after sign-out GET / ended at %s", resp.Request.URL)
	}
}

// withToken makes a call of c.anon carry token.
func withToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func TestOverviewShowsHostCapacityAndPhases(t *testing.T) {
	c := start(t)
	hostOpts, err := c.api.HostDialOptions("hv1")
	if err != nil {
		t.Fatal(err)
	}
	hostConn, err := grpc.NewClient(c.api.Addr, hostOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer hostConn.Close()
	hostAPI := minicloudv1.NewHostServiceClient(hostConn)
	reg, err := hostAPI.RegisterHost(ctx(t), &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: "hv1"}, Address: "127.0.0.1:8642", Hypervisors: []string{"kvm"},
		Capacity: &minicloudv1.Resources{Vcpus: 4, MemoryMib: 8192, DiskGib: 100}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hostAPI.Heartbeat(ctx(t), &minicloudv1.HeartbeatRequest{Name: "hv1"}); err != nil {
		t.Fatal(err)
	}
	// The bars' ends are what may be claimed: capacity times the ratio.
	ratios := reg.GetHost().GetAllocationRatios()
	vcpus, ram := int(4*ratios.GetCpu()), int(8192*max(ratios.GetRam(), 1))
	for _, n := range []string{"a", "b"} {
		if _, err := c.admin.VMs.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: n, Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}}); err != nil {
			t.Fatal(err)
		}
	}
	c.signIn(c.api.AdminToken)
	_, body := c.do("GET", "/", nil, false)
	for _, want := range []string{
		`<h3>hv1 <span class="state state-up">UP</span>`,
		fmt.Sprintf(`<meter min="0" max="%d" value="0"`, vcpus), // vCPU (no VM placed: no scheduler runs)
		fmt.Sprintf(`<meter min="0" max="%d" value="0"`, ram),   // RAM
		`<meter min="0" max="100" value="0"`,                    // disk
		`<span class="phase phase-pending">PENDING</span> <span class="count">2</span>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("overview lacks %s:\n%s", want, body)
		}
	}
	// The other pages list what the API holds.
	for path, want := range map[string]string{
		"/hosts": "<td>hv1</td>", "/images": "<td>tiny</td>", "/flavors": "<td>tiny</td><td>1</td><td>256 MiB</td>",
		"/networks": "<td>default</td><td>10.99.0.0/24</td>",
	} {
		resp, body := c.do("GET", path, nil, false)
		if resp.StatusCode != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("GET %s: %s, lacks %s:\n%s", path, resp.Status, want, body)
		}
	}
}

// sse reads a server-sent event stream.
type sse struct {
	events chan sseEvent
}

type sseEvent struct{ id, name, data string }

func (c *console) openEvents(path string) *sse {
	c.t.Helper()
	req, err := http.NewRequestWithContext(ctx(c.t), "GET", c.srv.URL+path, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	resp, err := c.browser.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		c.t.Fatalf("GET %s: %s %s", path, resp.Status, resp.Header.Get("Content-Type"))
	}
	s := &sse{events: make(chan sseEvent, 64)}
	go func() {
		defer close(s.events)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.name != "" {
					s.events <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "id: "):
				ev.id = line[4:]
			case strings.HasPrefix(line, "event: "):
				ev.name = line[7:]
			case strings.HasPrefix(line, "data: "):
				ev.data += line[6:] + "\n"
			}
		}
	}()
	return s
}

// next is the next event named name whose data contains want.
func (s *sse) next(t *testing.T, name, want string) sseEvent {
	t.Helper()
	for ev := range s.events {
		if ev.name == name && strings.Contains(ev.data, want) {
			return ev
		}
	}
	t.Fatalf("the stream ended without a %s event with %q", name, want)
	return sseEvent{}
}

var rvAttr = regexp.MustCompile(`data-live-src="/vms/events\?rv=(\d+)"`)

func TestVMListLiveCreateAndDelete(t *testing.T) {
	c := start(t)
	c.signIn(c.api.AdminToken)
	_, page := c.do("GET", "/vms", nil, false)
	m := rvAttr.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("the VM list has no live stream:\n%s", page)
	}
	live := c.openEvents("/vms/events?rv=" + m[1])

	// Create from the form (as htmx posts it): the form comes back empty,
	// and the new VM reaches the list through the stream.
	resp, body := c.do("POST", "/vms", url.Values{"name": {"web1"}, "image": {"tiny"}, "flavor": {"tiny"}, "network": {""}, "request_id": {"r1"}}, true)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "Created web1.") || !strings.Contains(body, `value=""`) {
		t.Fatalf("create: %s\n%s", resp.Status, body)
	}
	vm, err := c.admin.VMs.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	row := live.next(t, "update", `id="vm-`+vm.Meta.Id+`"`)
	if !strings.Contains(row.data, `<a href="/vms/web1">web1</a>`) || !strings.Contains(row.data, ">PENDING<") {
		t.Fatalf("live row: %s", row.data)
	}
	// The same form again (a double submit) creates nothing more.
	c.do("POST", "/vms", url.Values{"name": {"web1"}, "image": {"tiny"}, "flavor": {"tiny"}, "request_id": {"r1"}}, true)
	list, err := c.admin.VMs.ListVMs(ctx(t), &minicloudv1.ListVMsRequest{})
	if err != nil || len(list.Vms) != 1 {
		t.Fatalf("after a resubmit: %d VMs, %v", len(list.GetVms()), err)
	}

	// A bad name: the API's message, as the CLI prints it, next to the field.
	_, apiErr := c.admin.VMs.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "Bad_Name", Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}})
	if apiErr == nil {
		t.Fatal("the API accepted Bad_Name")
	}
	_, body = c.do("POST", "/vms", url.Values{"name": {"Bad_Name"}, "image": {"tiny"}, "flavor": {"tiny"}}, true)
	errName := regexp.MustCompile(`(?s)name="name" value="Bad_Name"[^>]*aria-invalid="true"[^>]*>\s*</label>\s*<p class="field-error" id="err-name" role="alert">([^<]*)</p>`).FindStringSubmatch(body)
	if errName == nil || html.UnescapeString(errName[1]) != apiErr.Error() {
		t.Fatalf("bad name: want %q next to the name field:\n%s", apiErr, body)
	}
	// An unknown flavor is shown next to the flavor.
	_, body = c.do("POST", "/vms", url.Values{"name": {"web2"}, "image": {"tiny"}, "flavor": {"huge"}}, false)
	if !strings.Contains(body, `id="err-flavor"`) || !strings.Contains(body, "flavor huge not found") {
		t.Fatalf("unknown flavor:\n%s", body)
	}

	// The VM page: spec, status, the event timeline, the console log panel.
	resp, body = c.do("GET", "/vms/web1", nil, false)
	// Its terminal (xterm.js) needs inline styles; scripts stay strict.
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self';") || !strings.Contains(csp, "style-src 'self' 'unsafe-inline';") {
		t.Errorf("VM page CSP %q", csp)
	}
	for _, want := range []string{"<h1>web1</h1>", vm.Meta.Id, `id="vm-status-` + vm.Meta.Id + `"`, ">PENDING<", `class="timeline"`, `id="console-log"`} {
		if !strings.Contains(body, want) {
			t.Errorf("VM page lacks %s", want)
		}
	}
	if t.Failed() {
		t.Fatalf("VM page: %s\n%s", resp.Status, body)
	}

	// Stop and start from the page change the VM's spec, as the CLI's do;
	// an action on a VM that is not there gets the API's message.
	resp, body = c.do("POST", "/vms/web1/stop", url.Values{}, true)
	if got, err := c.admin.VMs.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"}); err != nil ||
		resp.StatusCode != http.StatusOK || !strings.Contains(body, "stop requested for web1") ||
		got.GetSpec().GetPowerState() != minicloudv1.PowerState_POWER_STATE_STOPPED {
		t.Fatalf("stop: %s %s, power state %v (%v)", resp.Status, body, got.GetSpec().GetPowerState(), err)
	}
	c.do("POST", "/vms/web1/start", url.Values{}, true)
	if got, err := c.admin.VMs.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "web1"}); err != nil || got.GetSpec().GetPowerState() != minicloudv1.PowerState_POWER_STATE_RUNNING {
		t.Fatalf("start: power state %v (%v)", got.GetSpec().GetPowerState(), err)
	}
	_, apiErr = c.admin.VMs.StopVM(ctx(t), &minicloudv1.VMActionRequest{Name: "nope"})
	if _, body = c.do("POST", "/vms/nope/stop", url.Values{}, true); apiErr == nil || !strings.Contains(body, html.EscapeString(apiErr.Error())) {
		t.Fatalf("stop of a VM that is not there: %s, want the API's %q", body, apiErr)
	}

	// Delete: the row goes from the list.
	resp, body = c.do("POST", "/vms/web1/delete", url.Values{}, true)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "delete requested for web1") {
		t.Fatalf("delete: %s\n%s", resp.Status, body)
	}
	live.next(t, "gone", "vm-"+vm.Meta.Id)
}

func TestHostileInputIsEscaped(t *testing.T) {
	c := start(t)
	const evil = `<script>alert(1)</script>"'><img src=x onerror=alert(2)>`
	if _, err := c.admin.VMs.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "x", Labels: map[string]string{"note": evil},
		Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}}); err != nil {
		t.Fatal(err)
	}
	c.signIn(c.api.AdminToken)
	_, body := c.do("GET", "/vms/x", nil, false)
	if strings.Contains(body, "<script>alert") || strings.Contains(body, "<img src=x") {
		t.Fatalf("label value reached the page unescaped:\n%s", body)
	}
	if !strings.Contains(body, html.EscapeString("<script>alert(1)</script>")) {
		t.Fatalf("label value not shown:\n%s", body)
	}
}

func TestCrossOriginPostRefused(t *testing.T) {
	c := start(t)
	c.signIn(c.api.AdminToken)
	req, err := http.NewRequestWithContext(ctx(t), "POST", c.srv.URL+"/vms", strings.NewReader("name=evil&image=tiny&flavor=tiny"))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", "https://attacker.example")
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	resp, err := c.browser.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("cross-site POST: %s, want 403", resp.Status)
	}
	if _, err := c.admin.VMs.GetVM(ctx(t), &minicloudv1.GetVMRequest{Name: "evil"}); err == nil {
		t.Fatal("a cross-site POST created a VM")
	}
}

func TestReaderSeesNoHostsAndCannotCreate(t *testing.T) {
	c := start(t)
	user, err := c.admin.Auth.CreateUser(ctx(t), &minicloudv1.CreateUserRequest{Name: "ro", Project: "default", Role: "reader"})
	if err != nil {
		t.Fatal(err)
	}
	c.signIn(user.GetToken())
	_, body := c.do("GET", "/", nil, false)
	if !strings.Contains(body, "Hosts are shown to admins only.") {
		t.Fatalf("a reader's overview:\n%s", body)
	}
	_, apiErr := c.anon.VMs.CreateVM(withToken(ctx(t), user.GetToken()), &minicloudv1.CreateVMRequest{Name: "r1", Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}})
	if apiErr == nil {
		t.Fatal("a reader created a VM through the API")
	}
	_, body = c.do("POST", "/vms", url.Values{"name": {"r1"}, "image": {"tiny"}, "flavor": {"tiny"}}, true)
	if !strings.Contains(body, html.EscapeString(apiErr.Error())) {
		t.Fatalf("a reader's create: want the API's %q:\n%s", apiErr, body)
	}
}
