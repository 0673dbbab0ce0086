// Package webui is minicloud's web console: server-rendered pages (Go
// html/template, progressively enhanced with htmx and a small script of
// our own) served by the API server on its HTTP listener. It holds no
// state and no authority of its own: every page is rendered from gRPC
// calls made with the signed-in user's token, so what a user sees and may
// do is exactly what the API's policy allows (docs/web.md).
package webui

import (
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Config configures the console.
type Config struct {
	// API is a connection to the API (errdefs kinds on errors, TLS
	// trusting the cluster CA, no credentials of its own: every call
	// carries the signed-in user's token).
	API *client.Client
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Insecure drops the Secure attribute of the session cookie, for a
	// console served over plain HTTP in tests. Never set in production:
	// the console is served over TLS.
	Insecure bool
}

// Handler serves the console at the root of its listener.
type Handler struct {
	api      *client.Client
	log      *slog.Logger
	insecure bool
	pages    pageTemplates
	mux      *http.ServeMux
	csrf     *http.CrossOriginProtection
	// live holds a slot per open live stream (maxLiveStreams).
	live chan struct{}
}

// New returns the console's handler.
func New(cfg Config) (*Handler, error) {
	if cfg.API == nil {
		return nil, errors.New("webui: no API client")
	}
	pages, err := parseTemplates()
	if err != nil {
		return nil, err
	}
	h := &Handler{api: cfg.API, log: cfg.Logger, insecure: cfg.Insecure, pages: pages, mux: http.NewServeMux(),
		csrf: http.NewCrossOriginProtection(), live: make(chan struct{}, maxLiveStreams)}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	static, err := fs.Sub(staticFS, "static")
	if err != nil {
		return nil, fmt.Errorf("webui static files: %w", err)
	}
	h.mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	h.mux.HandleFunc("GET /login", h.loginPage)
	h.mux.HandleFunc("POST /login", h.login)
	h.mux.HandleFunc("POST /logout", h.logout)
	h.mux.Handle("GET /{$}", h.signedIn(h.overview))
	h.mux.Handle("GET /vms", h.signedIn(h.vmList))
	h.mux.Handle("GET /vms/events", h.signedIn(h.vmEvents))
	h.mux.Handle("POST /vms", h.signedIn(h.vmCreate))
	h.mux.Handle("GET /vms/{name}", h.signedIn(h.vmPage))
	h.mux.Handle("GET /vms/{name}/console-log", h.signedIn(h.vmConsoleLog))
	h.mux.Handle("POST /vms/{name}/{action}", h.signedIn(h.vmAction))
	h.mux.Handle("GET /vms/{name}/console/ws", h.signedIn(h.vmConsole))
	h.mux.Handle("GET /images", h.signedIn(listPage(h, "images", func() *minicloudv1.ListImagesRequest { return &minicloudv1.ListImagesRequest{} },
		h.api.Images.ListImages, (*minicloudv1.ListImagesResponse).GetImages)))
	h.mux.Handle("GET /flavors", h.signedIn(listPage(h, "flavors", func() *minicloudv1.ListFlavorsRequest { return &minicloudv1.ListFlavorsRequest{} },
		h.api.Flavors.ListFlavors, (*minicloudv1.ListFlavorsResponse).GetFlavors)))
	h.mux.Handle("GET /networks", h.signedIn(listPage(h, "networks", func() *minicloudv1.ListNetworksRequest { return &minicloudv1.ListNetworksRequest{} },
		h.api.Networks.ListNetworks, (*minicloudv1.ListNetworksResponse).GetNetworks)))
	h.mux.Handle("GET /hosts", h.signedIn(h.hostList))
	return h, nil
}

// contentSecurityPolicy allows the page's own scripts, styles and
// connections only: no inline script or style, no eval, no framing, forms
// posting to the console only. VM names, metadata and console output are
// hostile input; html/template escapes them, and this is the second wall.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// terminalSecurityPolicy is the VM page's: the same, except that styles
// may be inline, because xterm.js's renderer writes the terminal's
// colours and cell sizes into <style> elements it makes at run time (no
// nonce, contents that depend on the font measured). Scripts stay as
// strict; an inline style cannot run code, and html/template keeps
// markup out of what the page shows.
const terminalSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; " +
	"connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// ServeHTTP sets the security headers every answer carries and refuses
// cross-origin state changes (CSRF) before routing.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	hdr.Set("Content-Security-Policy", contentSecurityPolicy)
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("Referrer-Policy", "no-referrer")
	hdr.Set("X-Frame-Options", "DENY")
	hdr.Set("Cross-Origin-Opener-Policy", "same-origin")
	if err := h.csrf.Check(r); err != nil {
		http.Error(w, "cross-origin request refused: "+err.Error(), http.StatusForbidden)
		return
	}
	h.mux.ServeHTTP(w, r)
}
