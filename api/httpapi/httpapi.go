// Package httpapi is the API's HTTP listener: every user and operator RPC
// as HTTP/JSON under /v1/ (grpc-gateway, from the google.api.http options
// in proto/), the OpenAPI document generated from the same protos at
// /openapi.json, and whatever else is mounted beside them (the web UI at /).
//
// The gateway holds no authority of its own: it is a gRPC client of the API
// (over loopback, with TLS and the cluster CA) that forwards the caller's
// Authorization header, so authentication, authorization, validation and
// the audit log are exactly those of a gRPC call.
package httpapi

import (
	"bytes"
	"context"
	"crypto/tls"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strings"
	"sync/atomic"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// openAPI is generated from proto/ by hack/generate.sh (protoc-gen-openapiv2).
//
//go:embed openapi.json
var openAPI []byte

// OpenAPI returns the OpenAPI (Swagger 2.0) document of the HTTP API.
func OpenAPI() []byte { return bytes.Clone(openAPI) }

// DefaultMaxBodyBytes bounds a request body: the gRPC API's own bound on
// one request message (api/server.MaxRequestBytes), which JSON cannot
// undercut by much, so a body the API would refuse anyway is refused
// before it is read.
const DefaultMaxBodyBytes = 4 << 20

// DefaultMaxUploadBytes bounds the body of an image upload (POST
// /v1/images, a stream of JSON messages with base64 chunks): the API's own
// --image-max-bytes bounds the image itself.
const DefaultMaxUploadBytes = 96 << 30

// bodyReadTimeout bounds how long reading one (bounded) request body may
// take.
const bodyReadTimeout = time.Minute

// DefaultMaxStreams bounds the streaming calls open at once through one
// web listener. Every HTTP request is a call on the gateway's one
// connection to the API, which takes at most
// api/server.MaxConcurrentStreams (1,000) calls at once; streams last, so
// without this bound watches left open could hold every slot and make
// every other request wait.
const DefaultMaxStreams = 512

// Config configures the handler.
type Config struct {
	// API is the connection every call is made on: the API server's own
	// gRPC listener, dialled with TLS (DialAPI).
	API *grpc.ClientConn
	// MaxBodyBytes bounds a request body (0: DefaultMaxBodyBytes); a larger
	// one is refused with 413 before the API is called.
	MaxBodyBytes int64
	// MaxUploadBytes bounds an image upload's body (0: DefaultMaxUploadBytes).
	MaxUploadBytes int64
	// MaxStreams bounds the streaming calls (watches, downloads, uploads)
	// open at once through this handler (0: DefaultMaxStreams); one more
	// is refused with 429.
	MaxStreams int
	// Mounts are more handlers on the same listener, by http.ServeMux
	// pattern (e.g. "/" for the web UI). /v1/ and /openapi.json are the
	// API's and may not be mounted.
	Mounts map[string]http.Handler
}

// registration binds one service's HTTP routes to its client on cc.
type registration func(ctx context.Context, gw *runtime.ServeMux, cc grpc.ClientConnInterface) error

func bind[C any](register func(context.Context, *runtime.ServeMux, C) error, client func(grpc.ClientConnInterface) C) registration {
	return func(ctx context.Context, gw *runtime.ServeMux, cc grpc.ClientConnInterface) error {
		return register(ctx, gw, client(cc))
	}
}

// registrations are the HTTP bindings of every service with one. A service
// added to proto/ with google.api.http options is added here; the test
// that walks the proto registry fails until it is.
var registrations = []registration{
	bind(minicloudv1.RegisterVMServiceHandlerClient, minicloudv1.NewVMServiceClient),
	bind(minicloudv1.RegisterFlavorServiceHandlerClient, minicloudv1.NewFlavorServiceClient),
	bind(minicloudv1.RegisterNetworkServiceHandlerClient, minicloudv1.NewNetworkServiceClient),
	bind(minicloudv1.RegisterServerGroupServiceHandlerClient, minicloudv1.NewServerGroupServiceClient),
	bind(minicloudv1.RegisterImageServiceHandlerClient, minicloudv1.NewImageServiceClient),
	bind(minicloudv1.RegisterHostServiceHandlerClient, minicloudv1.NewHostServiceClient),
	bind(minicloudv1.RegisterAuthServiceHandlerClient, minicloudv1.NewAuthServiceClient),
	bind(minicloudv1.RegisterAuditServiceHandlerClient, minicloudv1.NewAuditServiceClient),
	bind(minicloudv1.RegisterIdentityServiceHandlerClient, minicloudv1.NewIdentityServiceClient),
	bind(minicloudv1.RegisterQuotaServiceHandlerClient, minicloudv1.NewQuotaServiceClient),
}

// streamLimit is the API connection with a bound on the streams open
// through it (Config.MaxStreams).
type streamLimit struct {
	grpc.ClientConnInterface
	slots chan struct{}
}

func (c *streamLimit) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	select {
	case c.slots <- struct{}{}:
	default:
		return nil, status.Errorf(codes.ResourceExhausted,
			"this web listener has %d streams (watches, downloads, uploads) open, its limit: close one, or use the gRPC API", cap(c.slots))
	}
	s, err := c.ClientConnInterface.NewStream(ctx, desc, method, opts...)
	if err != nil {
		<-c.slots
		return nil, err
	}
	// The gateway calls with the HTTP request's context, which ends when
	// the request does, however the stream ended.
	context.AfterFunc(ctx, func() { <-c.slots })
	return s, nil
}

// NewHandler builds the listener's handler: the gateway under /v1/, the
// OpenAPI document at /openapi.json, and cfg.Mounts.
func NewHandler(ctx context.Context, cfg Config) (http.Handler, error) {
	if cfg.API == nil {
		return nil, errors.New("httpapi: Config.API is required")
	}
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if cfg.MaxUploadBytes == 0 {
		cfg.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = DefaultMaxStreams
	}
	api := &streamLimit{ClientConnInterface: cfg.API, slots: make(chan struct{}, cfg.MaxStreams)}
	gw := runtime.NewServeMux(
		// Unknown JSON fields are refused (400), as the gRPC API refuses
		// unknown proto fields: a misspelt field is an error, not a no-op.
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.JSONPb{
			MarshalOptions:   protojson.MarshalOptions{EmitUnpopulated: true},
			UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: false},
		}),
		runtime.WithIncomingHeaderMatcher(incomingHeader),
		runtime.WithErrorHandler(uploadTooLarge),
		runtime.WithOutgoingHeaderMatcher(outgoingHeader),
	)
	for _, register := range registrations {
		if err := register(ctx, gw, api); err != nil {
			return nil, fmt.Errorf("httpapi: register gateway: %w", err)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("/v1/", limitBody(gw, cfg.MaxBodyBytes, cfg.MaxUploadBytes))
	mux.HandleFunc("GET /openapi.json", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(openAPI)
	})
	for pattern, h := range cfg.Mounts {
		if p := patternPath(pattern); p == "/v1" || strings.HasPrefix(p, "/v1/") || p == "/openapi.json" {
			return nil, fmt.Errorf("httpapi: mount %q: the API serves that path", pattern)
		}
		mux.Handle(pattern, h)
	}
	return mux, nil
}

// patternPath is the path of an http.ServeMux pattern "[METHOD ][HOST]/PATH".
func patternPath(pattern string) string {
	if _, rest, ok := strings.Cut(pattern, " "); ok {
		pattern = strings.TrimLeft(rest, " \t")
	}
	if i := strings.IndexByte(pattern, '/'); i > 0 {
		pattern = pattern[i:]
	}
	return pattern
}

// incomingHeader forwards X-Request-Id to the API, which records it in the
// audit log, and no other header: a call through the gateway carries no
// more of the caller than a gRPC client could send. (The gateway itself
// adds Authorization, unprefixed, and X-Forwarded-For/-Host.)
func incomingHeader(key string) (string, bool) {
	if textproto.CanonicalMIMEHeaderKey(key) == "X-Request-Id" {
		return "x-request-id", true
	}
	return "", false
}

// outgoingHeader returns the API's x-request-id as X-Request-Id, and other
// response metadata with the gateway's Grpc-Metadata- prefix.
func outgoingHeader(key string) (string, bool) {
	if key == "x-request-id" {
		return "X-Request-Id", true
	}
	return runtime.MetadataHeaderPrefix + key, true
}

// limitBody refuses a body over max with 413 before the gateway reads it.
// Bodies of unary calls are small and read whole anyway, so it reads them
// (up to max+1 bytes) here, which also catches a chunked body with no
// Content-Length. An image upload streams: its body is bounded by
// maxUpload as it is read instead.
func limitBody(gw *runtime.ServeMux, max, maxUpload int64) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/images" {
			if r.ContentLength > maxUpload {
				tooLarge(gw, w, r, maxUpload)
				return
			}
			capped := &cappedBody{ReadCloser: http.MaxBytesReader(w, r.Body, maxUpload), max: maxUpload}
			r.Body = capped
			gw.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), cappedBodyKey{}, capped)))
			return
		}
		if r.ContentLength > max {
			tooLarge(gw, w, r, max)
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			// A body trickled in slowly would hold this handler; headers
			// are bounded by the server's ReadHeaderTimeout. The deadline
			// is lifted once the body is in: a read error on the connection
			// later would cancel the call still running.
			rc := http.NewResponseController(w)
			_ = rc.SetReadDeadline(time.Now().Add(bodyReadTimeout))
			body, err := io.ReadAll(io.LimitReader(r.Body, max+1))
			_ = rc.SetReadDeadline(time.Time{})
			if err != nil {
				writeError(gw, w, r, http.StatusBadRequest, status.Errorf(codes.InvalidArgument, "read request body: %v", err))
				return
			}
			if int64(len(body)) > max {
				tooLarge(gw, w, r, max)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		gw.ServeHTTP(w, r)
	})
}

// cappedBody is an upload's body, which notes when it hit its bound: the
// gateway reports any error reading the body as INVALID_ARGUMENT, and
// uploadTooLarge turns that one into 413.
type cappedBody struct {
	io.ReadCloser
	max      int64
	exceeded atomic.Bool
}

type cappedBodyKey struct{}

func (c *cappedBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		c.exceeded.Store(true)
	}
	return n, err
}

// uploadTooLarge is the gateway's error handler: its default, but 413 for
// an upload cut off at its bound.
func uploadTooLarge(ctx context.Context, gw *runtime.ServeMux, m runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
	if c, ok := r.Context().Value(cappedBodyKey{}).(*cappedBody); ok && c.exceeded.Load() {
		tooLarge(gw, w, r, c.max)
		return
	}
	runtime.DefaultHTTPErrorHandler(ctx, gw, m, w, r, err)
}

func tooLarge(gw *runtime.ServeMux, w http.ResponseWriter, r *http.Request, max int64) {
	writeError(gw, w, r, http.StatusRequestEntityTooLarge, status.Errorf(codes.ResourceExhausted,
		"request body larger than %d bytes: this API takes at most %d bytes in one request (upload images with POST /v1/images or minicloud image create)", max, max))
}

// writeError writes err as the gateway writes its own errors ({"code",
// "message", "details"}), with the given HTTP status.
func writeError(gw *runtime.ServeMux, w http.ResponseWriter, r *http.Request, httpStatus int, err error) {
	_, out := runtime.MarshalerForRequest(gw, r)
	runtime.DefaultHTTPErrorHandler(r.Context(), gw, out, w, r, &runtime.HTTPStatusError{HTTPStatus: httpStatus, Err: err})
}

// NewServer is the listener's http.Server: TLS with the API's serving
// certificate, and bounds on how long a client may take to send its
// headers and how large they may be. There is no write timeout: a watch
// (GET /v1/vms:watch) or an image download streams for as long as it lasts.
func NewServer(h http.Handler, serving *tls.Config) *http.Server {
	cfg := serving.Clone()
	// Callers prove who they are with tokens only: the gateway could not
	// pass a client certificate on, so none is asked for.
	cfg.ClientAuth = tls.NoClientCert
	cfg.ClientCAs, cfg.VerifyConnection = nil, nil
	// The gRPC listener's configuration may offer h2 only; browsers and
	// curl also speak HTTP/1.1.
	cfg.NextProtos = []string{"h2", "http/1.1"}
	return &http.Server{
		Handler:           h,
		TLSConfig:         cfg,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
}
