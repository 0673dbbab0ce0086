package webui

import (
	"context"
	"net/http"
	"strings"

	"google.golang.org/grpc/metadata"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// cookieName holds the user's API token. The console keeps no sessions of
// its own: the cookie is the token, so revoking the token (minicloud token
// revoke) signs the browser out at its next request.
const cookieName = "minicloud_token"

// maxTokenBytes bounds what is accepted as a token (minicloud's are ~50
// bytes); anything longer is not one.
const maxTokenBytes = 4096

// session is a signed-in request: a context whose gRPC calls carry the
// user's token, and who the API says the user is.
type session struct {
	ctx context.Context
	who *minicloudv1.WhoAmIResponse
}

// withToken makes ctx's outgoing gRPC calls carry token, as the CLI sends
// it (authorization: Bearer).
func withToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// signedIn runs next for a request that carries a token the API accepts,
// and sends anyone else to the login page.
func (h *Handler) signedIn(next func(http.ResponseWriter, *http.Request, *session)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := r.Cookie(cookieName)
		if err != nil || c.Value == "" {
			h.toLogin(w, r, "")
			return
		}
		ctx := withToken(r.Context(), c.Value)
		who, err := h.api.Auth.WhoAmI(ctx, &minicloudv1.WhoAmIRequest{})
		if err != nil {
			if errdefs.IsUnauthenticated(err) {
				h.clearCookie(w)
				h.toLogin(w, r, err.Error())
				return
			}
			h.fail(w, r, err)
			return
		}
		next(w, r, &session{ctx: ctx, who: who})
	})
}

// toLogin redirects to the login page; htmx requests are told to load it
// as a whole page rather than swap it into a fragment.
func (h *Handler) toLogin(w http.ResponseWriter, r *http.Request, why string) {
	if r.Header.Get("HX-Request") == "true" {
		w.Header().Set("HX-Redirect", "/login")
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	// Streams (EventSource, WebSocket) and forms cannot follow a redirect
	// to a page: they are told to sign in.
	if r.Method != http.MethodGet || r.Header.Get("Accept") == "text/event-stream" || r.Header.Get("Upgrade") != "" {
		http.Error(w, "sign in first: "+why, http.StatusUnauthorized)
		return
	}
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

type loginView struct {
	Error string
}

func (h *Handler) loginPage(w http.ResponseWriter, r *http.Request) {
	h.render(w, r, http.StatusOK, "login", nil, loginView{})
}

// login checks the pasted token with the API (WhoAmI) before keeping it,
// so a typo is shown at once, next to the field.
func (h *Handler) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 2*maxTokenBytes)
	token := strings.TrimSpace(r.PostFormValue("token"))
	fail := func(msg string) {
		h.render(w, r, http.StatusUnprocessableEntity, "login", nil, loginView{Error: msg})
	}
	switch {
	case token == "":
		fail("paste a token: `minicloud token create` makes one")
		return
	case len(token) > maxTokenBytes || strings.ContainsAny(token, " \t\r\n;,\"\\"):
		fail("that is not a minicloud token")
		return
	}
	if _, err := h.api.Auth.WhoAmI(withToken(r.Context(), token), &minicloudv1.WhoAmIRequest{}); err != nil {
		fail(err.Error())
		return
	}
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: token, Path: "/", HttpOnly: true,
		Secure: !h.insecure, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (h *Handler) logout(w http.ResponseWriter, r *http.Request) {
	h.clearCookie(w)
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

func (h *Handler) clearCookie(w http.ResponseWriter) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/", MaxAge: -1, HttpOnly: true,
		Secure: !h.insecure, SameSite: http.SameSiteStrictMode})
}
