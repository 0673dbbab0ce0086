package webui

import (
	"bytes"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// pageTemplates maps a page name (its file name without .html) to the
// layout, the shared fragments and that page's "content" parsed together.
type pageTemplates map[string]*template.Template

// shared are the templates every page is parsed with: the layout and the
// fragments that pages and the live endpoints render alone.
var shared = []string{"templates/layout.html", "templates/fragments.html"}

var funcs = template.FuncMap{
	"phase": func(p minicloudv1.VMPhase) string { return strings.TrimPrefix(p.String(), "VM_PHASE_") },
	"hostState": func(s minicloudv1.HostState) string {
		return strings.TrimPrefix(s.String(), "HOST_STATE_")
	},
	"lower": strings.ToLower,
	"time": func(ts *timestamppb.Timestamp) string {
		if ts == nil || (ts.Seconds == 0 && ts.Nanos == 0) {
			return "-"
		}
		return ts.AsTime().UTC().Format(time.DateTime)
	},
	"gib": func(b int64) string { return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30)) },
	// scaled is capacity times its allocation ratio (1 when unset), what
	// the scheduler allows to be claimed.
	"scaled": func(capacity int64, ratio float64) int64 {
		if ratio <= 0 {
			ratio = 1
		}
		return int64(float64(capacity) * ratio)
	},
	"join":     strings.Join,
	"int64":    func(i int32) int64 { return int64(i) },
	"stats":    func(id string) statsView { return statsView{ID: id} },
	"rowID":    func(vm *minicloudv1.VM) string { return domID(vm, false) },
	"statusID": func(vm *minicloudv1.VM) string { return domID(vm, true) },
}

func parseTemplates() (pageTemplates, error) {
	base, err := template.New("").Funcs(funcs).ParseFS(templateFS, shared...)
	if err != nil {
		return nil, fmt.Errorf("webui templates: %w", err)
	}
	files, err := fs.Glob(templateFS, "templates/*.html")
	if err != nil {
		return nil, fmt.Errorf("webui templates: %w", err)
	}
	pages := pageTemplates{}
	for _, f := range files {
		if isShared(f) {
			continue
		}
		t, err := template.Must(base.Clone()).ParseFS(templateFS, f)
		if err != nil {
			return nil, fmt.Errorf("webui template %s: %w", f, err)
		}
		pages[strings.TrimSuffix(path.Base(f), ".html")] = t
	}
	pages[""] = base
	return pages, nil
}

func isShared(f string) bool {
	for _, s := range shared {
		if s == f {
			return true
		}
	}
	return false
}

// view is what the layout renders a page with.
type view struct {
	// Page names the page (its nav entry is marked current).
	Page string
	// Who is the signed-in user (nil on the login page).
	Who  *minicloudv1.WhoAmIResponse
	Data any
}

// render writes page with data inside the layout. The page is rendered to
// a buffer first, so a template error becomes a 500, not half a page.
func (h *Handler) render(w http.ResponseWriter, r *http.Request, status int, page string, s *session, data any) {
	t, ok := h.pages[page]
	if !ok {
		h.fail(w, r, errdefs.Internal("no page %q", page))
		return
	}
	v := view{Page: page, Data: data}
	if s != nil {
		v.Who = s.who
	}
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, "layout", v); err != nil {
		h.log.Error("webui render", "page", page, "err", err)
		http.Error(w, "the page could not be rendered", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if page == "vm" {
		w.Header().Set("Content-Security-Policy", terminalSecurityPolicy)
	}
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// fragment renders one named fragment (a table row, a form) alone.
func (h *Handler) fragment(name string, data any) ([]byte, error) {
	var buf bytes.Buffer
	if err := h.pages[""].ExecuteTemplate(&buf, name, data); err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	return buf.Bytes(), nil
}

// writeFragment answers an htmx request with one fragment.
func (h *Handler) writeFragment(w http.ResponseWriter, r *http.Request, name string, data any) {
	b, err := h.fragment(name, data)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(b)
}

// errorStatus is the HTTP status for an API error of err's kind.
func errorStatus(err error) int {
	switch errdefs.KindOf(err) {
	case errdefs.KindNotFound:
		return http.StatusNotFound
	case errdefs.KindInvalidArgument:
		return http.StatusUnprocessableEntity
	case errdefs.KindAlreadyExists, errdefs.KindConflict, errdefs.KindFailedPrecondition:
		return http.StatusConflict
	case errdefs.KindPermissionDenied:
		return http.StatusForbidden
	case errdefs.KindUnauthenticated:
		return http.StatusUnauthorized
	case errdefs.KindResourceExhausted:
		return http.StatusTooManyRequests
	case errdefs.KindUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// fail shows an error page with the API's message (it is the user's own
// request's answer, as the CLI would print it).
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the browser went away (a navigation, a closed tab)
	}
	status := errorStatus(err)
	if status == http.StatusInternalServerError {
		h.log.Error("webui", "path", r.URL.Path, "err", err)
	}
	if r.Header.Get("HX-Request") == "true" {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(status)
		b, ferr := h.fragment("error", err.Error())
		if ferr == nil {
			_, _ = w.Write(b)
		}
		return
	}
	h.render(w, r, status, "error", nil, err.Error())
}
