package imageservice

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// The codec's wire form of a chunk is what proto makes of the same
// message, and it decodes back to the same data; the buffer goes back to
// the pool once gRPC frees it.
func TestServerCodecSendsChunksAsProto(t *testing.T) {
	c := ServerCodec()
	for _, n := range []int{0, 1, 127, 128, 16383, 16384, downloadChunkSize - 1, downloadChunkSize} {
		buf := chunkBuffers.Get(downloadChunkSize)
		*buf = (*buf)[:n]
		for i := range *buf {
			(*buf)[i] = byte(i*31 + n)
		}
		data := bytes.Clone(*buf)
		ch := newBlobChunk(buf)
		got, err := c.Marshal(ch)
		if err != nil {
			t.Fatal(err)
		}
		ch.release()
		want, err := proto.Marshal(&minicloudv1.DownloadImageResponse{Data: data})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Materialize(), want) {
			t.Fatalf("%d bytes: codec's wire form differs from proto's", n)
		}
		var back minicloudv1.DownloadImageResponse
		if err := c.Unmarshal(got, &back); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back.GetData(), data) {
			t.Fatalf("%d bytes: decoded data differs", n)
		}
		got.Free()
	}
	// Any other message is proto's.
	msg := &minicloudv1.DownloadImageRequest{Name: "debian", Sha256: "ab"}
	got, err := c.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := proto.Marshal(msg); !bytes.Equal(got.Materialize(), want) {
		t.Fatal("a request marshals differently from proto")
	}
}

// A chunk no codec took (a server without ServerCodec, or a send that
// failed before marshalling) gives its buffer back itself.
func TestUntakenChunkReleasesItsBuffer(t *testing.T) {
	buf := chunkBuffers.Get(10)
	ch := newBlobChunk(buf)
	if b, err := proto.Marshal(ch); err != nil || len(b) != 12 {
		t.Fatalf("a chunk is not the plain message to proto: %d bytes, %v", len(b), err)
	}
	ch.release()
	if ch.GetData() != nil || ch.buf != nil {
		t.Fatal("release kept the buffer")
	}
}
