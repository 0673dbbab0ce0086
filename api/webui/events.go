package webui

import (
	"bytes"
	"fmt"
	"net/http"
	"strconv"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// maxLiveStreams bounds the live streams (each holds a WatchVMs stream to
// the API) the console serves at once; beyond it a page stays as loaded.
const maxLiveStreams = 256

// keepAlive is how often an idle stream sends a comment, so proxies and
// the browser keep the connection open.
const keepAlive = 25 * time.Second

// vmEvents is the server-sent event stream behind the live VM list and
// the VM page, fed by WatchVMs with the user's token (so it shows exactly
// the VMs the API lets the user watch). Each change is sent as the
// rendered HTML of the element that shows the VM (a table row, or the VM
// page's status panel), with an id the page swaps by; a removed VM is a
// "gone" event with that id. The event id is the resource version, so a
// reconnecting EventSource (Last-Event-ID) resumes where it stopped.
//
// Query: rv, the resource version the page was rendered at; name, one VM
// (its page) rather than the list.
func (h *Handler) vmEvents(w http.ResponseWriter, r *http.Request, s *session) {
	release, ok := h.liveSlot(w)
	if !ok {
		return
	}
	defer release()
	name := r.URL.Query().Get("name")
	rv, _ := strconv.ParseInt(r.URL.Query().Get("rv"), 10, 64)
	if last, err := strconv.ParseInt(r.Header.Get("Last-Event-ID"), 10, 64); err == nil && last > 0 {
		rv = last
	}
	stream, err := h.api.VMs.WatchVMs(s.ctx, &minicloudv1.WatchVMsRequest{Name: name, ResourceVersion: max(rv, 0)})
	if err != nil {
		h.fail(w, r, err)
		return
	}
	rc := http.NewResponseController(w)
	hdr := w.Header()
	hdr.Set("Content-Type", "text/event-stream")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}

	type recv struct {
		ev  *minicloudv1.WatchVMsResponse
		err error
	}
	events := make(chan recv)
	go func() {
		for {
			ev, err := stream.Recv()
			select {
			case events <- recv{ev, err}:
			case <-r.Context().Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	tick := time.NewTicker(keepAlive)
	defer tick.Stop()
	// A VM's page also gets its stats, sampled while the page is open.
	var statsTick <-chan time.Time
	var series statsSeries
	if name != "" {
		t := time.NewTicker(statsEvery)
		defer t.Stop()
		statsTick = t.C
	}
	for {
		var msg []byte
		select {
		case <-r.Context().Done():
			return
		case <-tick.C:
			msg = []byte(": keep-alive\n\n")
		case <-statsTick:
			if msg, err = h.statsMessage(s, name, &series); err != nil {
				h.log.Error("webui live stream", "err", err)
				return
			}
		case got := <-events:
			if got.err != nil {
				// The watch ended (the API restarted, or the resume point
				// is older than its history): the page reloads to get a
				// fresh list and a fresh stream.
				h.log.Info("webui live stream ended", "err", got.err)
				msg = []byte("event: reset\ndata: " + sseLine(got.err.Error()) + "\n\n")
			} else if msg, err = h.eventMessage(s, got.ev, name != ""); err != nil {
				h.log.Error("webui live stream", "err", err)
				return
			}
		}
		if msg == nil {
			continue
		}
		if _, err := w.Write(msg); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
		if bytes.HasPrefix(msg, []byte("event: reset")) {
			return
		}
	}
}

// liveSlot takes one of the maxLiveStreams slots for a live stream or a
// console session, or answers 503 when none is free.
func (h *Handler) liveSlot(w http.ResponseWriter) (release func(), ok bool) {
	select {
	case h.live <- struct{}{}:
		return func() { <-h.live }, true
	default:
		http.Error(w, "too many live views open; try again later", http.StatusServiceUnavailable)
		return nil, false
	}
}

// statsMessage samples the VM's stats and renders its charts.
func (h *Handler) statsMessage(s *session, id string, series *statsSeries) ([]byte, error) {
	v := statsView{ID: id}
	st, err := h.api.VMs.GetVMStats(s.ctx, &minicloudv1.GetVMStatsRequest{Name: id})
	if err != nil {
		// Not running, or its host cannot be asked now: say so in the
		// panel; the next sample may succeed.
		v.Message = err.Error()
	} else {
		series.add(st)
		v.Charts = series.charts()
	}
	html, err := h.fragment("vmstats", v)
	if err != nil {
		return nil, err
	}
	return sseEvent("update", html), nil
}

// statsView is the VM page's stats panel.
type statsView struct {
	ID      string
	Charts  []chart
	Message string
}

// sseEvent is one server-sent event carrying an HTML fragment.
func sseEvent(name string, html []byte) []byte {
	var b bytes.Buffer
	b.WriteString("event: " + name + "\n")
	for _, line := range bytes.Split(bytes.TrimSpace(html), []byte("\n")) {
		b.WriteString("data: ")
		b.Write(bytes.TrimRight(line, "\r"))
		b.WriteString("\n")
	}
	b.WriteString("\n")
	return b.Bytes()
}

// eventMessage is one server-sent event for a watch event, nil for none.
func (h *Handler) eventMessage(s *session, ev *minicloudv1.WatchVMsResponse, detail bool) ([]byte, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "id: %d\n", ev.GetResourceVersion())
	vm := ev.GetVm()
	switch ev.GetType() {
	case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK:
		// Only the id moves on.
		b.WriteString(": bookmark\n\n")
		return b.Bytes(), nil
	case minicloudv1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
		fmt.Fprintf(&b, "event: gone\ndata: %s\n\n", sseLine(domID(vm, detail)))
		return b.Bytes(), nil
	}
	var html []byte
	var err error
	if detail {
		var v *vmView
		if v, err = h.vmDetailOf(s, vm); err != nil {
			return nil, err
		}
		html, err = h.fragment("vmstatus", v)
	} else {
		html, err = h.fragment("vmrow", vm)
	}
	if err != nil {
		return nil, err
	}
	b.Write(sseEvent("update", html))
	return b.Bytes(), nil
}

// domID is the id of the element that shows vm: its row, or its page's
// status panel. Ids, not names, so no user input reaches an id.
func domID(vm *minicloudv1.VM, detail bool) string {
	if detail {
		return "vm-status-" + vm.GetMeta().GetId()
	}
	return "vm-" + vm.GetMeta().GetId()
}

// sseLine keeps s on one data line.
func sseLine(s string) string {
	return string(bytes.ReplaceAll(bytes.ReplaceAll([]byte(s), []byte("\r"), nil), []byte("\n"), []byte(" ")))
}
