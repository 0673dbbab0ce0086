package webui_test

import (
	"encoding/json"
	"html"
	"net/http"
	"strings"
	"testing"

	"github.com/gorilla/websocket"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// dialConsole opens the VM page's console WebSocket as the page does.
func (c *console) dialConsole(name, origin string) (*websocket.Conn, *http.Response, error) {
	u := "ws" + strings.TrimPrefix(c.srv.URL, "http") + "/vms/" + name + "/console/ws"
	hdr := http.Header{}
	if origin != "" {
		hdr.Set("Origin", origin)
	}
	d := websocket.Dialer{Jar: c.browser.Jar}
	return d.DialContext(ctx(c.t), u, hdr)
}

func TestConsoleWebSocket(t *testing.T) {
	c := start(t)
	c.signIn(c.api.AdminToken)
	if _, err := c.admin.VMs.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web1", Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}}); err != nil {
		t.Fatal(err)
	}
	// Another site's page cannot open it (cross-site WebSocket hijacking).
	if _, resp, err := c.dialConsole("web1", "https://attacker.example"); err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("cross-origin console: %v %v, want 403", resp, err)
	}
	// A VM that does not run: the API's refusal, as the CLI gets it.
	stream, err := c.admin.VMs.AttachConsole(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Attach{Attach: &minicloudv1.ConsoleAttach{Name: "web1"}}})
	_, apiErr := stream.Recv()
	if apiErr == nil {
		t.Fatal("the API attached to a VM that does not run")
	}
	ws, _, err := c.dialConsole("web1", c.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	kind, b, err := ws.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	var msg struct{ Type, Message string }
	if kind != websocket.TextMessage || json.Unmarshal(b, &msg) != nil || msg.Type != "error" || msg.Message != apiErr.Error() {
		t.Fatalf("console of a pending VM: %q, want the API's %q", b, apiErr)
	}
	// Not signed in: no console.
	c.do("POST", "/logout", nil, false)
	if _, resp, err := c.dialConsole("web1", c.srv.URL); err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("console without a token: %v %v, want 401", resp, err)
	}
}

// The VM page's stream samples GetVMStats while the page is open; a VM
// that does not run gets the API's reason in the stats panel.
func TestStatsPanelOfAVMThatDoesNotRun(t *testing.T) {
	c := start(t)
	c.signIn(c.api.AdminToken)
	vm, err := c.admin.VMs.CreateVM(ctx(t), &minicloudv1.CreateVMRequest{Name: "web1", Spec: &minicloudv1.VMSpec{Image: "tiny", Flavor: "tiny"}})
	if err != nil {
		t.Fatal(err)
	}
	_, apiErr := c.admin.VMs.GetVMStats(ctx(t), &minicloudv1.GetVMStatsRequest{Name: vm.Meta.Id})
	if apiErr == nil {
		t.Fatal("the API gave stats of a VM that does not run")
	}
	live := c.openEvents("/vms/events?name=" + vm.Meta.Id)
	ev := live.next(t, "update", `id="vm-stats-`+vm.Meta.Id+`"`)
	if !strings.Contains(ev.data, html.EscapeString(apiErr.Error())) {
		t.Fatalf("stats panel: %s, want the API's %q", ev.data, apiErr)
	}
}
