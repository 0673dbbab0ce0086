package main

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

func TestExitCode(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"nil", nil, 0},
		{"plain", errors.New("boom"), 1},
		{"usage", usagef("bad flag"), 2},
		{"wrapped usage", fmt.Errorf("x: %w", usagef("bad")), 2},
		{"invalid", errdefs.Invalid("bad name"), 2},
		{"not found", errdefs.NotFound("no vm"), 3},
		{"already exists", errdefs.AlreadyExists("dup"), 4},
		{"conflict", errdefs.Conflict("stale"), 5},
		{"failed precondition", errdefs.FailedPrecondition("in use"), 5},
		{"unavailable", errdefs.Unavailable("down"), 6},
		{"timeout", &timeoutError{msg: "timed out"}, 6},
		{"deadline", fmt.Errorf("wait: %w", context.DeadlineExceeded), 6},
		{"internal", errdefs.Internal("bug"), 1},
		{"resource exhausted", errdefs.ResourceExhausted("too big"), 1},
		// What the client interceptor makes of wire errors.
		{"wire not found", errdefs.FromGRPC(status.Error(codes.NotFound, "x")), 3},
		{"wire aborted", errdefs.FromGRPC(status.Error(codes.Aborted, "x")), 5},
		{"wire deadline", errdefs.FromGRPC(status.Error(codes.DeadlineExceeded, "x")), 6},
		{"wire invalid", errdefs.FromGRPC(status.Error(codes.InvalidArgument, "x")), 2},
	} {
		if got := exitCode(tc.err); got != tc.want {
			t.Errorf("%s: exitCode(%v) = %d, want %d", tc.name, tc.err, got, tc.want)
		}
	}
}

func TestErrorMessageForUnreachableAPI(t *testing.T) {
	err := errdefs.FromGRPC(status.Error(codes.Unavailable, `connection error: desc = "dial tcp 127.0.0.1:1: connect: connection refused"`))
	msg := errorMessage(err, "127.0.0.1:1")
	if want := "cannot reach the minicloud API at 127.0.0.1:1"; len(msg) < len(want) || msg[:len(want)] != want {
		t.Fatalf("message %q does not start with %q", msg, want)
	}
	if got := errorMessage(errdefs.NotFound(`vm "x" not found`), "e"); got != `vm "x" not found` {
		t.Fatalf("message %q", got)
	}
}
