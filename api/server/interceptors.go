package server

import (
	"context"
	"log/slog"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/minicloud/minicloud/pkg/errdefs"
)

// refuseUnknownFieldsUnary refuses requests carrying fields this server's
// protos do not define: a newer client asking for something this server
// would silently ignore must hear so instead.
func refuseUnknownFieldsUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := checkUnknownFields(req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func refuseUnknownFieldsStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, &unknownFieldsStream{ServerStream: ss})
}

type unknownFieldsStream struct{ grpc.ServerStream }

func (s *unknownFieldsStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return checkUnknownFields(m)
}

func checkUnknownFields(m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil
	}
	if where := unknownFieldsIn(pm.ProtoReflect()); where != "" {
		return errdefs.Invalid("request carries fields unknown to this server (in %s): the client is newer than the server; upgrade the server or leave those fields unset", where)
	}
	return nil
}

// unknownFieldsIn returns the full name of the first message under m that
// has unknown fields, or "".
func unknownFieldsIn(m protoreflect.Message) string {
	if len(m.GetUnknown()) > 0 {
		return string(m.Descriptor().FullName())
	}
	// The fields by descriptor, not m.Range: its callback would capture
	// the result and be allocated per message, on every call.
	fds := m.Descriptor().Fields()
	for i := range fds.Len() {
		fd := fds.Get(i)
		if !m.Has(fd) {
			continue
		}
		found := ""
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := m.Get(fd).List()
			for j := 0; j < l.Len() && found == ""; j++ {
				found = unknownFieldsIn(l.Get(j).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			m.Get(fd).Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				found = unknownFieldsIn(mv.Message())
				return found == ""
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			found = unknownFieldsIn(m.Get(fd).Message())
		}
		if found != "" {
			return found
		}
	}
	return ""
}

// logUnary logs every call: failures of the client's making at info,
// server failures at error, successes at debug.
func (s *Server) logUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	s.logCall(ctx, info.FullMethod, start, err)
	return resp, err
}

func (s *Server) logStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, ss)
	s.logCall(ss.Context(), info.FullMethod, start, err)
	return err
}

func (s *Server) logCall(ctx context.Context, method string, start time.Time, err error) {
	code := status.Code(errdefs.ToGRPC(err))
	level := slog.LevelDebug
	// err is a gRPC status already (errdefs' interceptor runs inside this
	// one): classify it by its code, or every NotFound was an error.
	switch errdefs.KindOf(errdefs.FromGRPC(err)) {
	case errdefs.KindInternal, errdefs.KindUnknown:
		if err != nil && ctx.Err() == nil {
			level = slog.LevelError
		}
	case errdefs.KindUnavailable:
		level = slog.LevelWarn
	default:
		level = slog.LevelInfo
	}
	if err == nil {
		level = slog.LevelDebug
	}
	if !s.log.Enabled(ctx, level) {
		// Every call comes here, most at debug: build nothing to drop.
		return
	}
	attrs := []any{"method", method, "code", code.String(), "duration", time.Since(start)}
	if err != nil {
		attrs = append(attrs, "err", err)
	}
	s.log.Log(ctx, level, "rpc", attrs...)
}
