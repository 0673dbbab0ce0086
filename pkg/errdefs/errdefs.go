// Package errdefs is minicloud's one error taxonomy. Every component wraps
// its errors with one of these kinds; the API maps them to gRPC codes on the
// way out and the client maps the codes back (see grpc.go), so that
// IsNotFound(err) holds on both sides of the wire and the CLI can turn them
// into exit codes.
package errdefs

import (
	"errors"
	"fmt"
)

// Kind is one class of error.
type Kind int

const (
	KindUnknown Kind = iota
	KindNotFound
	KindAlreadyExists
	KindInvalidArgument
	KindConflict           // stale resource version or lost race: retry on a fresh read
	KindFailedPrecondition // the system is not in a state that allows this (e.g. image in use)
	KindUnavailable        // a dependency is down: retry later
	KindResourceExhausted  // quota, size or rate limit
	KindPermissionDenied
	KindInternal
	KindUnauthenticated // the caller did not prove who it is (no, bad, expired or revoked credential)
)

var kindNames = map[Kind]string{
	KindUnknown:            "unknown",
	KindNotFound:           "not found",
	KindAlreadyExists:      "already exists",
	KindInvalidArgument:    "invalid argument",
	KindConflict:           "conflict",
	KindFailedPrecondition: "failed precondition",
	KindUnavailable:        "unavailable",
	KindResourceExhausted:  "resource exhausted",
	KindPermissionDenied:   "permission denied",
	KindInternal:           "internal",
	KindUnauthenticated:    "unauthenticated",
}

func (k Kind) String() string { return kindNames[k] }

// Error is an error of a known kind. Wrap it with fmt.Errorf("...: %w") as
// usual; KindOf finds it through the chain.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string {
	switch {
	case e.Msg != "" && e.Err != nil:
		return e.Msg + ": " + e.Err.Error()
	case e.Msg != "":
		return e.Msg
	case e.Err != nil:
		return e.Err.Error()
	}
	return e.Kind.String()
}

func (e *Error) Unwrap() error { return e.Err }

func newf(k Kind, format string, args ...any) error {
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...)}
}

// Constructors, one per kind.
func NotFound(format string, args ...any) error      { return newf(KindNotFound, format, args...) }
func AlreadyExists(format string, args ...any) error { return newf(KindAlreadyExists, format, args...) }
func Invalid(format string, args ...any) error       { return newf(KindInvalidArgument, format, args...) }
func Conflict(format string, args ...any) error      { return newf(KindConflict, format, args...) }
func FailedPrecondition(format string, args ...any) error {
	return newf(KindFailedPrecondition, format, args...)
}
func Unavailable(format string, args ...any) error { return newf(KindUnavailable, format, args...) }
func ResourceExhausted(format string, args ...any) error {
	return newf(KindResourceExhausted, format, args...)
}
func PermissionDenied(format string, args ...any) error {
	return newf(KindPermissionDenied, format, args...)
}
func Internal(format string, args ...any) error { return newf(KindInternal, format, args...) }
func Unauthenticated(format string, args ...any) error {
	return newf(KindUnauthenticated, format, args...)
}

// Wrap gives err a kind while keeping it in the chain.
func Wrap(k Kind, err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...), Err: err}
}

// KindOf returns the kind of the first *Error in err's chain.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindUnknown
}

func IsNotFound(err error) bool           { return KindOf(err) == KindNotFound }
func IsAlreadyExists(err error) bool      { return KindOf(err) == KindAlreadyExists }
func IsInvalid(err error) bool            { return KindOf(err) == KindInvalidArgument }
func IsConflict(err error) bool           { return KindOf(err) == KindConflict }
func IsFailedPrecondition(err error) bool { return KindOf(err) == KindFailedPrecondition }
func IsUnavailable(err error) bool        { return KindOf(err) == KindUnavailable }
func IsResourceExhausted(err error) bool  { return KindOf(err) == KindResourceExhausted }
func IsUnauthenticated(err error) bool    { return KindOf(err) == KindUnauthenticated }
