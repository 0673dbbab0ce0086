package imagecache

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestSinkCodecDeliversTheData decodes DownloadImage messages spread over
// gRPC buffers split at every offset of the header, and messages the fast
// path must leave to the proto codec (empty, an extra field), and checks
// that the sink got exactly the data of each, in order.
func TestSinkCodecDeliversTheData(t *testing.T) {
	data := bytes.Repeat([]byte("minicloud"), 20000) // a 3-byte length
	plain, err := proto.Marshal(&minicloudv1.DownloadImageResponse{Data: data})
	if err != nil {
		t.Fatal(err)
	}
	extra := protowire.AppendTag(bytes.Clone(plain), 2, protowire.VarintType) // a field of a newer API
	extra = protowire.AppendVarint(extra, 7)
	type msg struct {
		wire  []byte
		split int
		data  []byte
	}
	var msgs []msg
	for split := 0; split <= 6; split++ {
		msgs = append(msgs, msg{plain, split, data})
	}
	msgs = append(msgs, msg{nil, 0, nil}, msg{extra, 3, data})

	f, err := os.Create(t.TempDir() + "/out")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := newSink(f, false)
	c := newSinkCodec(s)
	var want []byte
	for i, m := range msgs {
		var bs mem.BufferSlice
		if m.split > 0 {
			bs = append(bs, mem.SliceBuffer(m.wire[:m.split]))
		}
		bs = append(bs, mem.SliceBuffer(m.wire[m.split:]))
		var got minicloudv1.DownloadImageResponse
		if err := c.Unmarshal(bs, &got); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if len(got.GetData()) != 0 {
			t.Errorf("message %d: data left in the message", i)
		}
		want = append(want, m.data...)
	}
	sum, n, err := s.Close()
	if err != nil {
		t.Fatal(err)
	}
	if w := sha256.Sum256(want); n != int64(len(want)) || !bytes.Equal(sum, w[:]) {
		t.Fatalf("sink got %d bytes, want %d", n, len(want))
	}
	if got, _ := os.ReadFile(f.Name()); !bytes.Equal(got, want) {
		t.Fatal("file differs")
	}
	// Other messages are the proto codec's.
	var req minicloudv1.DownloadImageRequest
	wire, _ := proto.Marshal(&minicloudv1.DownloadImageRequest{Name: "x"})
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(wire)}, &req); err != nil || req.GetName() != "x" {
		t.Fatal(fmt.Sprint("request decoded as ", req.String(), err))
	}
}
