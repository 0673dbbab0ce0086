package client

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// MaxListPages bounds how many pages ListAll follows (a server that kept
// answering with tokens would otherwise hold the client forever).
const MaxListPages = 10000

// ListAll calls a paginated List RPC (docs/api.md "Pages") page after page
// and returns the pages merged into one response: their items in order,
// no next_page_token. max > 0 stops once that many items are in (the
// rest of the last page is cut off). req's page_token is overwritten.
func ListAll[Req, Resp proto.Message](ctx context.Context, req Req, call func(context.Context, Req, ...grpc.CallOption) (Resp, error), max int) (Resp, error) {
	var all Resp
	reqMsg := req.ProtoReflect()
	token := reqMsg.Descriptor().Fields().ByName("page_token")
	if token == nil {
		return all, fmt.Errorf("%s has no page_token", reqMsg.Descriptor().FullName())
	}
	for page := 0; page < MaxListPages; page++ {
		resp, err := call(ctx, req)
		if err != nil {
			return all, err
		}
		m := resp.ProtoReflect()
		next := m.Descriptor().Fields().ByName("next_page_token")
		if next == nil {
			return all, fmt.Errorf("%s has no next_page_token", m.Descriptor().FullName())
		}
		nextToken := m.Get(next).String()
		if page == 0 {
			all = resp
		} else {
			proto.Merge(all, resp)
		}
		items := itemsOf(all.ProtoReflect())
		if max > 0 && items != nil && items.Len() >= max {
			items.Truncate(max)
			nextToken = ""
		}
		if nextToken == "" {
			all.ProtoReflect().Clear(next)
			return all, nil
		}
		reqMsg.Set(token, protoreflect.ValueOfString(nextToken))
	}
	return all, fmt.Errorf("list did not end after %d pages", MaxListPages)
}

// itemsOf is a list response's repeated field (each has one).
func itemsOf(m protoreflect.Message) protoreflect.List {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		if f := fields.Get(i); f.IsList() {
			return m.Mutable(f).List()
		}
	}
	return nil
}
