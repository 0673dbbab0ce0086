package etcdembed_test

import (
	"context"
	"testing"

	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

func TestPutGet(t *testing.T) {
	_, c := etcdtest.Start(t)
	ctx := context.Background()
	if _, err := c.Put(ctx, "/k", "v"); err != nil {
		t.Fatal(err)
	}
	r, err := c.Get(ctx, "/k")
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v" {
		t.Fatalf("got %v", r.Kvs)
	}
}
