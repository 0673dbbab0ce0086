package imagecache

import (
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// sinkCodec is the gRPC codec of one DownloadImage call: it writes the data
// of each message straight from gRPC's receive buffers into the download's
// sink. The proto codec would first gather a message into one buffer and
// then copy its data out into a new slice (hack/imagebench's profile: half
// a second of CPU per GiB for those two copies); the sink copies it once,
// into the buffers it hashes and writes. The messages handed back to the
// caller carry no data. It is "proto" on the wire.
type sinkCodec struct {
	out   *sink
	proto encoding.CodecV2
}

func newSinkCodec(out *sink) *sinkCodec {
	return &sinkCodec{out: out, proto: encoding.GetCodecV2(proto.Name)}
}

func (c *sinkCodec) Name() string { return proto.Name }

func (c *sinkCodec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c *sinkCodec) Unmarshal(data mem.BufferSlice, v any) error {
	msg, ok := v.(*minicloudv1.DownloadImageResponse)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	// The message is one bytes field, field 1: its tag, its length, then
	// the data, possibly spread over several of gRPC's buffers.
	bufs := make([][]byte, 0, len(data))
	for _, b := range data {
		bufs = append(bufs, b.ReadOnlyData())
	}
	if chunks, ok := onlyData(bufs, data.Len()); ok {
		for _, b := range chunks {
			if err := c.out.Write(b); err != nil {
				return err
			}
		}
		return nil
	}
	// Anything else (an empty message, a field a newer API added): the
	// proto codec decodes it, and its data goes to the sink from there.
	if err := c.proto.Unmarshal(data, msg); err != nil {
		return err
	}
	err := c.out.Write(msg.GetData())
	msg.Data = nil
	return err
}

// onlyData returns the data of a message whose wire form, n bytes in bufs,
// is field 1 (bytes) once and nothing else, as subslices of bufs.
func onlyData(bufs [][]byte, n int) ([][]byte, bool) {
	// The header is at most a 1-byte tag and a 10-byte varint.
	var head []byte
	for _, b := range bufs {
		head = append(head, b[:min(len(b), 11-len(head))]...)
		if len(head) == 11 {
			break
		}
	}
	num, typ, tagLen := protowire.ConsumeTag(head)
	if tagLen < 0 || num != 1 || typ != protowire.BytesType {
		return nil, false
	}
	size, sizeLen := protowire.ConsumeVarint(head[tagLen:])
	if sizeLen < 0 || uint64(n-tagLen-sizeLen) != size {
		return nil, false
	}
	skip := tagLen + sizeLen
	var out [][]byte
	for _, b := range bufs {
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		out = append(out, b[skip:])
		skip = 0
	}
	return out, true
}
