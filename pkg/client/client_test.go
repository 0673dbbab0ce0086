package client

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"

	"github.com/minicloud/minicloud/api/imageservice"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

// serve runs the real image service on a loopback port and returns a Client
// dialled to it.
func serve(t *testing.T) *Client {
	t.Helper()
	_, etcd := etcdtest.Start(t)
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(errdefs.UnaryServerInterceptor),
		grpc.ChainStreamInterceptor(errdefs.StreamServerInterceptor),
	)
	minicloudv1.RegisterImageServiceServer(srv, imageservice.New(imageservice.Config{Client: etcd, Dir: filepath.Join(t.TempDir(), "images")}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	c, err := Dial(context.Background(), lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestErrorsKeepTheirKind(t *testing.T) {
	c := serve(t)
	ctx := context.Background()

	_, err := c.Images.GetImage(ctx, &minicloudv1.GetImageRequest{Name: "missing"})
	if !errdefs.IsNotFound(err) {
		t.Fatalf("unary: got %v, want not found", err)
	}

	dl, err := c.Images.DownloadImage(ctx, &minicloudv1.DownloadImageRequest{Name: "missing", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dl.Recv(); !errdefs.IsNotFound(err) {
		t.Fatalf("server stream: got %v, want not found", err)
	}

	create := func(name string) error {
		up, err := c.Images.CreateImage(ctx)
		if err != nil {
			return err
		}
		up.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: &minicloudv1.CreateImageHeader{Name: name}}})
		up.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: minicloudv1.ImagePart_IMAGE_PART_DISK, Data: []byte("disk")}}})
		_, err = up.CloseAndRecv()
		return err
	}
	if err := create("img"); err != nil {
		t.Fatal(err)
	}
	if err := create("img"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("client stream: got %v, want already exists", err)
	}
	if err := create("Bad"); !errdefs.IsInvalid(err) {
		t.Fatalf("client stream: got %v, want invalid", err)
	}

	// The end of a stream is still io.EOF, not an error kind.
	dl, err = c.Images.DownloadImage(ctx, &minicloudv1.DownloadImageRequest{Name: "img", Part: minicloudv1.ImagePart_IMAGE_PART_DISK})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := dl.Recv()
	if err != nil || string(msg.GetData()) != "disk" {
		t.Fatalf("Recv = %q, %v", msg.GetData(), err)
	}
	if _, err := dl.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: got %v, want io.EOF", err)
	}
}

func TestUnreachableIsUnavailable(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close() // nothing listens there now
	c, err := Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Flavors.ListFlavors(context.Background(), &minicloudv1.ListFlavorsRequest{})
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("got %v, want unavailable", err)
	}
	if _, err := Dial(context.Background(), ""); !errdefs.IsInvalid(err) {
		t.Fatalf("empty endpoint: got %v", err)
	}
}
