package errdefs

import (
	"context"
	"errors"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var kindToCode = map[Kind]codes.Code{
	KindNotFound:           codes.NotFound,
	KindAlreadyExists:      codes.AlreadyExists,
	KindInvalidArgument:    codes.InvalidArgument,
	KindConflict:           codes.Aborted,
	KindFailedPrecondition: codes.FailedPrecondition,
	KindUnavailable:        codes.Unavailable,
	KindResourceExhausted:  codes.ResourceExhausted,
	KindPermissionDenied:   codes.PermissionDenied,
	KindInternal:           codes.Internal,
	KindUnauthenticated:    codes.Unauthenticated,
	KindUnknown:            codes.Unknown,
}

// ToGRPC converts err to a gRPC status error for the wire. Context errors
// keep their own codes; errors of no known kind become Internal.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	k := KindOf(err)
	if k == KindUnknown {
		return status.Error(codes.Internal, err.Error())
	}
	return status.Error(kindToCode[k], err.Error())
}

// FromGRPC converts a gRPC status error back into an *Error of the matching
// kind, so IsNotFound and friends work on clients.
func FromGRPC(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	for k, c := range kindToCode {
		if c == st.Code() && k != KindUnknown {
			return &Error{Kind: k, Msg: st.Message()}
		}
	}
	switch st.Code() {
	case codes.DeadlineExceeded:
		return &Error{Kind: KindUnavailable, Msg: st.Message(), Err: context.DeadlineExceeded}
	case codes.Canceled:
		return &Error{Kind: KindUnknown, Msg: st.Message(), Err: context.Canceled}
	}
	return &Error{Kind: KindUnknown, Msg: st.Message()}
}

// UnaryServerInterceptor maps handler errors to gRPC status codes.
func UnaryServerInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	return resp, ToGRPC(err)
}

// StreamServerInterceptor maps stream handler errors to gRPC status codes.
func StreamServerInterceptor(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return ToGRPC(handler(srv, ss))
}

// UnaryClientInterceptor maps status errors back to kinds on the client.
func UnaryClientInterceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return FromGRPC(invoker(ctx, method, req, reply, cc, opts...))
}
