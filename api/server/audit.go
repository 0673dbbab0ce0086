package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// auditNote is what the authenticating interceptor tells the audit
// interceptor around it: who called and in which project (after the
// default project was filled in), also for calls it refused.
type auditNote struct {
	p       *auth.Principal
	project string

	// Set by auditUnary, for a handler that writes the call's record
	// itself (committedAudit).
	method string
	req    proto.Message
	reqID  string
	// written says the handler stored the record: the call succeeded.
	written bool
}

type auditNoteKey struct{}

func noteAudit(ctx context.Context, p *auth.Principal, req proto.Message) {
	n, _ := ctx.Value(auditNoteKey{}).(*auditNote)
	if n == nil {
		return
	}
	if p != nil {
		n.p = p
	}
	if req != nil {
		if m, fd := projectField(req.ProtoReflect()); fd != nil {
			n.project = m.Get(fd).String()
		}
	}
}

// auditUnary writes one audit record per audited call (auth.Audited),
// allowed or refused, after it ran.
func (s *Server) auditUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !auth.Audited(info.FullMethod) {
		return handler(ctx, req)
	}
	msg, _ := req.(proto.Message)
	reqID := requestID(ctx, msg)
	n := &auditNote{method: info.FullMethod, req: msg, reqID: reqID}
	resp, err := handler(context.WithValue(ctx, auditNoteKey{}, n), req)
	s.writeAudit(ctx, info.FullMethod, n, msg, reqID, err)
	return resp, err
}

func (s *Server) auditStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !auth.Audited(info.FullMethod) {
		return handler(srv, ss)
	}
	n := &auditNote{}
	w := &auditedStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), auditNoteKey{}, n)}
	err := handler(srv, w)
	s.writeAudit(ss.Context(), info.FullMethod, n, w.first, requestID(ss.Context(), w.first), err)
	return err
}

// auditedStream keeps a stream's first message (its header names the
// object).
type auditedStream struct {
	grpc.ServerStream
	ctx   context.Context
	first proto.Message
}

func (a *auditedStream) Context() context.Context { return a.ctx }

func (a *auditedStream) RecvMsg(m any) error {
	err := a.ServerStream.RecvMsg(m)
	if err == nil && a.first == nil {
		a.first, _ = m.(proto.Message)
	}
	return err
}

// requestID is the request's request_id field, else its x-request-id
// header, else a fresh one (sent back as the x-request-id header).
func requestID(ctx context.Context, req proto.Message) string {
	if req != nil {
		if fd := req.ProtoReflect().Descriptor().Fields().ByName("request_id"); fd != nil && fd.Kind() == protoreflect.StringKind {
			if v := req.ProtoReflect().Get(fd).String(); v != "" {
				return v
			}
		}
	}
	if v := metadata.ValueFromIncomingContext(ctx, "x-request-id"); len(v) == 1 && len(v[0]) <= 128 {
		return v[0]
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-request-id", id))
	return id
}

// auditObject is what a request names: the first set of its name-like
// fields, or of its stream header's.
func auditObject(req proto.Message) string {
	if req == nil {
		return ""
	}
	m, _ := projectField(req.ProtoReflect())
	for _, f := range []protoreflect.Name{"name", "user", "id", "vm_id", "host_name", "host"} {
		fd := m.Descriptor().Fields().ByName(f)
		if fd == nil || fd.Kind() != protoreflect.StringKind {
			continue
		}
		v := m.Get(fd).String()
		switch {
		case v == "":
			continue
		case f == "id":
			// RevokeToken's id may be a whole token: record only its
			// public part, and nothing of what does not parse.
			if user, id, ok := auth.ParsePublicID(v); ok {
				return user + "." + id
			}
			return "(not a token id)"
		}
		return v
	}
	return ""
}

func (s *Server) writeAudit(ctx context.Context, method string, n *auditNote, req proto.Message, reqID string, callErr error) {
	if n.p == nil || n.written {
		// A caller without credentials is anyone on the network: storing
		// its attempts would let it fill etcd. The API's log has them
		// (logCall), and nothing happened.
		return
	}
	rec := auditRecord(method, n, req, reqID, callErr)
	// The call has happened: a record that cannot be written is logged,
	// and the caller still gets its answer. The write outlives a caller
	// that hung up.
	if err := s.audit.Append(context.WithoutCancel(ctx), rec); err != nil {
		s.log.Error("audit record not written", "rpc", rec.Rpc, "principal", rec.Principal, "object", rec.Object, "err", err)
	}
}

// committedAudit is the put of the call's record as it will read if the
// call succeeds, for a handler that commits it in its own transaction; it
// then calls its done once that transaction has committed, and the audit
// interceptor writes nothing more (on failure, it writes the record with
// the error as usual). ok is false when the call has no record to write
// (unaudited, or no credentials). A VM create does this: its record in a
// transaction of records of its own was a second etcd round trip after
// the create's, a third of a create's time at 64 clients
// (docs/benchmarks.md, "API").
func (s *Server) committedAudit(ctx context.Context) (op clientv3.Op, done func(), ok bool, err error) {
	n, _ := ctx.Value(auditNoteKey{}).(*auditNote)
	if n == nil || n.p == nil || n.method == "" {
		return clientv3.Op{}, nil, false, nil
	}
	op, err = s.audit.Op(ctx, auditRecord(n.method, n, n.req, n.reqID, nil))
	if err != nil {
		return clientv3.Op{}, nil, false, err
	}
	return op, func() { n.written = true }, true, nil
}

// auditRecord is the record of a call of method with req that ended with
// callErr.
func auditRecord(method string, n *auditNote, req proto.Message, reqID string, callErr error) *minicloudv1.AuditRecord {
	rec := &minicloudv1.AuditRecord{
		Time:      timestamppb.Now(),
		Principal: n.p.String(),
		Project:   n.project,
		Rpc:       strings.TrimPrefix(method, "/minicloud.v1."),
		Object:    auditObject(req),
		Code:      status.Code(errdefs.ToGRPC(callErr)).String(),
		RequestId: reqID,
	}
	if n.p != nil {
		rec.TokenId = n.p.TokenID
	}
	return rec
}

type auditService struct {
	minicloudv1.UnimplementedAuditServiceServer
	s *Server
}

// Bounds of one audit listing.
const (
	defaultAuditLimit = 100
	maxAuditLimit     = 1000
	maxAuditScan      = 20000
)

func (a *auditService) ListAuditRecords(ctx context.Context, req *minicloudv1.ListAuditRecordsRequest) (*minicloudv1.ListAuditRecordsResponse, error) {
	limit := int(req.GetLimit())
	switch {
	case limit == 0:
		limit = defaultAuditLimit
	case limit < 0 || limit > maxAuditLimit:
		return nil, errdefs.Invalid("limit %d is out of range: give 1 to %d", limit, maxAuditLimit)
	}
	if req.GetProject() != "" {
		if err := validateName("project", req.GetProject()); err != nil {
			return nil, err
		}
	}
	recs, err := store.ListAudit(ctx, a.s.etcd, req.GetProject(), limit, maxAuditScan)
	if err != nil {
		return nil, err
	}
	return &minicloudv1.ListAuditRecordsResponse{Records: recs}, nil
}
