package server_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
)

// lockedBuffer is a log destination the server's goroutines share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestCallLog: every call is logged at the level of its outcome, a call
// the client got wrong at info, a success at debug; a logger at info
// keeps the first and drops the second.
func TestCallLog(t *testing.T) {
	e := newEnv(t)
	e.seed()
	var logs lockedBuffer
	_, addr := e.serve(apiserver.Config{Client: e.etcd, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
		CA: e.ca, TLS: e.serverTLS(), AgentTLS: e.controlPlaneTLS()})
	flavors := minicloudv1.NewFlavorServiceClient(e.userConnTo(addr, e.admin))
	if _, err := flavors.GetFlavor(ctx(t), &minicloudv1.GetFlavorRequest{Name: "small"}); err != nil {
		t.Fatal(err)
	}
	if _, err := flavors.GetFlavor(ctx(t), &minicloudv1.GetFlavorRequest{Name: "missing"}); status.Code(err) != codes.NotFound {
		t.Fatalf("get missing flavor: %v", err)
	}
	var calls []string
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "msg=rpc") {
			calls = append(calls, line)
		}
	}
	if len(calls) != 1 || !strings.Contains(calls[0], "level=INFO") || !strings.Contains(calls[0], "method=/minicloud.v1.FlavorService/GetFlavor") ||
		!strings.Contains(calls[0], "code=NotFound") || !strings.Contains(calls[0], "missing") {
		t.Fatalf("logged calls %q, want only the NotFound one, at info with its method, code and error", calls)
	}
}

// TestTwoAuthorizationHeadersRefused: a call must carry one bearer token,
// not two (which would one be?).
func TestTwoAuthorizationHeadersRefused(t *testing.T) {
	e := newEnv(t)
	c := metadata.AppendToOutgoingContext(ctx(t), "authorization", "Bearer "+e.admin)
	_, err := e.flv.ListFlavors(c, &minicloudv1.ListFlavorsRequest{})
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "2 authorization headers") {
		t.Fatalf("call with two tokens: %v, want Unauthenticated naming 2 headers", err)
	}
}
