package imageservice

import (
	"sync"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// ServerCodec is the API server's gRPC codec: proto on the wire and for
// every message, except that a DownloadImage chunk read from a blob is sent
// without being copied. The API server installs it for all its services
// (grpc.ForceServerCodecV2). A server without it still serves downloads
// correctly (a chunk is also the plain message), with one more copy.
//
// Why: DownloadImage reads a blob into pooled buffers and this codec hands
// each to gRPC as it is, writing only the field's tag and length; the
// transport frees the buffer back to chunkBuffers once it has written it.
// The proto codec would take a zeroed 1 MiB buffer from gRPC's pool and
// copy the data into it (hack/imagebench's profile: ~0.3 s of CPU per GiB
// served, the API's largest cost after TLS and the socket).
func ServerCodec() encoding.CodecV2 { return chunkCodec{proto: encoding.GetCodecV2(proto.Name)} }

type chunkCodec struct {
	proto encoding.CodecV2
}

func (c chunkCodec) Name() string { return proto.Name }

func (c chunkCodec) Marshal(v any) (mem.BufferSlice, error) {
	if ch, ok := v.(*blobChunk); ok {
		return ch.take(), nil
	}
	return c.proto.Marshal(v)
}

func (c chunkCodec) Unmarshal(data mem.BufferSlice, v any) error { return c.proto.Unmarshal(data, v) }

// chunkBuffers holds the buffers blobs are read into. Unlike gRPC's
// default pool it does not zero them: a buffer is read into and only its
// first n (read) bytes are ever sent.
var chunkBuffers = &chunkPool{}

type chunkPool struct{ p sync.Pool }

func (c *chunkPool) Get(n int) *[]byte {
	if b, ok := c.p.Get().(*[]byte); ok && cap(*b) >= n {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, max(n, downloadChunkSize))
	return &b
}

func (c *chunkPool) Put(b *[]byte) {
	if cap(*b) >= downloadChunkSize {
		c.p.Put(b)
	}
}

// blobChunk is one DownloadImage message whose data is a pooled buffer.
// It embeds the message it is, so a codec that does not know the type
// marshals it as that message (copying the data).
type blobChunk struct {
	minicloudv1.DownloadImageResponse
	buf *[]byte
	// taken: the codec handed buf to gRPC, which frees it once written.
	taken bool
}

func newBlobChunk(buf *[]byte) *blobChunk {
	ch := &blobChunk{buf: buf}
	ch.Data = *buf
	return ch
}

// take is the message's wire form, field 1 (bytes) and the data, with the
// buffer owned from now on by what it returns.
func (ch *blobChunk) take() mem.BufferSlice {
	ch.taken = true
	if len(*ch.buf) == 0 {
		// proto3 leaves an empty bytes field out: an empty message.
		chunkBuffers.Put(ch.buf)
		return nil
	}
	head := protowire.AppendVarint(protowire.AppendTag(make([]byte, 0, 1+protowire.SizeVarint(uint64(len(*ch.buf)))), 1, protowire.BytesType), uint64(len(*ch.buf)))
	return mem.BufferSlice{mem.SliceBuffer(head), mem.NewBuffer(ch.buf, chunkBuffers)}
}

// release returns the buffer to the pool unless gRPC owns it now. Call it
// once SendMsg has returned.
func (ch *blobChunk) release() {
	if !ch.taken {
		chunkBuffers.Put(ch.buf)
	}
	ch.buf, ch.Data = nil, nil
}
