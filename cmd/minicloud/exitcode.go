package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// Exit codes. Scripts branch on them, so they never change meaning.
const (
	exitOK            = 0
	exitGeneric       = 1 // anything not listed below
	exitUsage         = 2 // bad command line or invalid argument
	exitNotFound      = 3
	exitAlreadyExists = 4
	exitConflict      = 5 // conflict or failed precondition (e.g. in use)
	exitUnavailable   = 6 // API unreachable, or a wait/timeout ran out
)

// usageError is a mistake on the command line, found before any call.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// timeoutError is a wait that ran out of time.
type timeoutError struct{ msg string }

func (e *timeoutError) Error() string { return e.msg }

// exitCode is the one place that maps errors to exit codes.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var ue *usageError
	var te *timeoutError
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &te), errors.Is(err, context.DeadlineExceeded):
		return exitUnavailable
	}
	switch errdefs.KindOf(err) {
	case errdefs.KindInvalidArgument:
		return exitUsage
	case errdefs.KindNotFound:
		return exitNotFound
	case errdefs.KindAlreadyExists:
		return exitAlreadyExists
	case errdefs.KindConflict, errdefs.KindFailedPrecondition:
		return exitConflict
	case errdefs.KindUnavailable:
		return exitUnavailable
	}
	return exitGeneric
}

// errorMessage is the one line printed after "minicloud: ". gRPC transport
// details are trimmed to what a person can act on.
func errorMessage(err error, endpoint string) string {
	msg := err.Error()
	if errdefs.IsUnavailable(err) && strings.Contains(msg, "connection error") {
		return fmt.Sprintf("cannot reach the minicloud API at %s (is minicloudd running? set --endpoint or MINICLOUD_ENDPOINT): %s", endpoint, msg)
	}
	return msg
}
