package webui

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/gorilla/websocket"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// consoleInputBytes is the most input one ConsoleRequest carries (the
// API's limit); a larger WebSocket message is split.
const consoleInputBytes = 4096

// maxConsoleMessage bounds one WebSocket message from the browser
// (keystrokes and pastes).
const maxConsoleMessage = 64 << 10

// consoleWriteWait bounds how long a write to the browser may block
// before the session is given up (a browser that stopped reading).
const consoleWriteWait = 30 * time.Second

// upgrader accepts the console's WebSocket from the console's own pages
// only: gorilla's default origin check refuses an Origin whose host is
// not the request's (cross-site WebSocket hijacking; the cookie is
// SameSite=Strict as well).
var upgrader = websocket.Upgrader{ReadBufferSize: consoleInputBytes, WriteBufferSize: 32 << 10}

// consoleControl is a text message to the page about the session; console
// output goes as binary messages.
type consoleControl struct {
	Type string `json:"type"` // attached, notice, closed, error
	// Writer says whether keystrokes reach the guest (attached).
	Writer bool `json:"writer,omitempty"`
	// WriterLost: another session took the write side (notice). Other
	// notices (input of a reading session dropped) change nothing.
	WriterLost bool   `json:"writerLost,omitempty"`
	Readers    int32  `json:"readers,omitempty"`
	Message    string `json:"message,omitempty"`
}

// vmConsole bridges the page's terminal (xterm.js) to AttachConsole with
// the user's token: output as binary messages, keystrokes back. It asks
// to write; when another session writes, it attaches to read and says so
// (?take_over=1 takes the write side instead). The API decides who may
// read or write, as for `minicloud vm console`.
func (h *Handler) vmConsole(w http.ResponseWriter, r *http.Request, s *session) {
	release, ok := h.liveSlot(w)
	if !ok {
		return
	}
	defer release()
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader answered
	}
	defer ws.Close()
	ws.SetReadLimit(maxConsoleMessage)
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()

	send := func(msgType int, b []byte) error {
		_ = ws.SetWriteDeadline(time.Now().Add(consoleWriteWait))
		return ws.WriteMessage(msgType, b)
	}
	control := func(c consoleControl) error {
		b, _ := json.Marshal(c)
		return send(websocket.TextMessage, b)
	}
	fail := func(err error) {
		_ = control(consoleControl{Type: "error", Message: err.Error()})
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	}

	attach := &minicloudv1.ConsoleAttach{Name: r.PathValue("name"), Write: true, TakeOver: r.URL.Query().Get("take_over") == "1"}
	stream, first, err := h.attachConsole(ctx, attach)
	if errdefs.IsFailedPrecondition(err) && !attach.TakeOver {
		// Another session writes (or the VM is not running, which the
		// read-only attach reports again): read along.
		attach.Write = false
		stream, first, err = h.attachConsole(ctx, attach)
	}
	if err != nil {
		fail(err)
		return
	}
	a := first.GetAttached()
	if err := control(consoleControl{Type: "attached", Writer: a.GetWriter(), Readers: a.GetReaders()}); err != nil {
		return
	}

	// Keystrokes: browser -> guest.
	go func() {
		defer cancel()
		for {
			kind, b, err := ws.ReadMessage()
			if err != nil {
				return
			}
			if kind != websocket.BinaryMessage {
				continue
			}
			for len(b) > 0 {
				n := min(len(b), consoleInputBytes)
				if err := stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Data{Data: b[:n]}}); err != nil {
					return
				}
				b = b[n:]
			}
		}
	}()

	// Output: guest -> browser.
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil {
				fail(err)
			}
			return
		}
		switch m := resp.GetMsg().(type) {
		case *minicloudv1.ConsoleResponse_Data:
			err = send(websocket.BinaryMessage, m.Data)
		case *minicloudv1.ConsoleResponse_Notice:
			err = control(consoleControl{Type: "notice", WriterLost: m.Notice.GetWriterLost(), Message: m.Notice.GetMessage()})
		case *minicloudv1.ConsoleResponse_Closed:
			_ = control(consoleControl{Type: "closed", Message: m.Closed.GetReason()})
			return
		}
		if err != nil {
			return
		}
	}
}

// attachConsole opens AttachConsole and reads its first answer (attached,
// or the API's refusal).
func (h *Handler) attachConsole(ctx context.Context, attach *minicloudv1.ConsoleAttach) (minicloudv1.VMService_AttachConsoleClient, *minicloudv1.ConsoleResponse, error) {
	stream, err := h.api.VMs.AttachConsole(ctx)
	if err != nil {
		return nil, nil, err
	}
	// A refused send (the stream already ended) is told by Recv, with
	// the API's status.
	_ = stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Attach{Attach: attach}})
	first, err := stream.Recv()
	if err != nil {
		return nil, nil, err
	}
	if first.GetAttached() == nil {
		return nil, nil, errdefs.Internal("the console's first answer was not attached: %v", first)
	}
	return stream, first, nil
}
