package paging_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/api/paging"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/etcdembed/etcdtest"
)

type req struct {
	size  int32
	token string
}

func (r req) GetPageSize() int32   { return r.size }
func (r req) GetPageToken() string { return r.token }

// recordingKV records how many keys each Get returned.
type recordingKV struct {
	clientv3.KV
	got []int
}

func (k *recordingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	resp, err := k.KV.Get(ctx, key, opts...)
	if err == nil {
		k.got = append(k.got, len(resp.Kvs))
	}
	return resp, err
}

func put(t *testing.T, kv clientv3.KV, n int, prefix string) {
	t.Helper()
	for i := range n {
		if _, err := kv.Put(context.Background(), fmt.Sprintf("%s%04d", prefix, i), "v"); err != nil {
			t.Fatal(err)
		}
	}
}

// scanAll follows the pages of prefix, keeping keys keep accepts.
func scanAll(t *testing.T, tokens *paging.Tokens, kv clientv3.KV, prefix string, size int32, keep func(string) bool) (keys []string, pages int) {
	t.Helper()
	r := req{size: size}
	for {
		p, err := tokens.Open("things", prefix, "", r)
		if err != nil {
			t.Fatal(err)
		}
		next, err := p.Scan(context.Background(), kv, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) {
			n := 0
			for _, kv := range kvs {
				if keep(string(kv.Key)) {
					keys = append(keys, string(kv.Key))
					n++
				}
			}
			return n, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		if next == "" {
			return keys, pages
		}
		r.token = next
	}
}

func TestPagesReadWithARangeLimit(t *testing.T) {
	_, cli := etcdtest.Start(t)
	put(t, cli, 95, "/things/")
	put(t, cli, 3, "/thingsmore/") // beyond the prefix: never read
	kv := &recordingKV{KV: cli.KV}
	tokens := paging.NewTokens([]byte("secret"))
	keys, pages := scanAll(t, tokens, kv, "/things/", 10, func(string) bool { return true })
	if len(keys) != 95 || pages != 10 || keys[0] != "/things/0000" || keys[94] != "/things/0094" {
		t.Fatalf("%d keys in %d pages: %v", len(keys), pages, keys)
	}
	total := 0
	for _, n := range kv.got {
		if n > 10 {
			t.Fatalf("a read returned %d keys for a page of 10: reads %v", n, kv.got)
		}
		total += n
	}
	if total != 95 {
		t.Fatalf("read %d keys to list 95 (reads %v)", total, kv.got)
	}

	// A filter keeping one key in ten still fills pages, reading on.
	kv.got = nil
	keys, pages = scanAll(t, tokens, kv, "/things/", 4, func(k string) bool { return strings.HasSuffix(k, "7") })
	if len(keys) != 9 || pages != 3 {
		t.Fatalf("filtered: %d keys in %d pages: %v", len(keys), pages, keys)
	}
}

func TestPagesReadOneSnapshot(t *testing.T) {
	_, cli := etcdtest.Start(t)
	put(t, cli, 10, "/things/")
	tokens := paging.NewTokens([]byte("secret"))
	p, _ := tokens.Open("things", "/things/", "", req{size: 5})
	first, err := p.Scan(context.Background(), cli, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) { return len(kvs), nil })
	if err != nil || first == "" {
		t.Fatal(first, err)
	}
	// Written after the first page: the next pages do not see it.
	put(t, cli, 12, "/things/")
	p, err = tokens.Open("things", "/things/", "", req{size: 100, token: first})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	if next, err := p.Scan(context.Background(), cli, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) { n += len(kvs); return len(kvs), nil }); err != nil || next != "" || n != 5 {
		t.Fatalf("second page: %d keys, next %q, %v; want the 5 of the first page's snapshot", n, next, err)
	}
	// Once etcd compacted that snapshot, the token is refused: start again.
	resp, _ := cli.Get(context.Background(), "x")
	if _, err := cli.Compact(context.Background(), resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	p, _ = tokens.Open("things", "/things/", "", req{size: 5, token: first})
	if _, err := p.Scan(context.Background(), cli, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) { return len(kvs), nil }); !errdefs.IsConflict(err) {
		t.Fatalf("compacted snapshot: %v, want Conflict (ABORTED)", err)
	}
}

func TestBadPageRequestsAreRefused(t *testing.T) {
	_, cli := etcdtest.Start(t)
	put(t, cli, 3, "/things/")
	tokens := paging.NewTokens([]byte("secret"))
	p, _ := tokens.Open("things", "/things/", "f1", req{size: 1})
	tok, err := p.Scan(context.Background(), cli, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) { return len(kvs), nil })
	if err != nil || tok == "" {
		t.Fatal(tok, err)
	}
	body, sig, _ := strings.Cut(tok, ".")
	for name, r := range map[string]struct {
		list, filters string
		req           req
		want          string
	}{
		"negative size":     {"things", "f1", req{size: -1}, "page_size -1 is out of range"},
		"size over the max": {"things", "f1", req{size: paging.MaxSize + 1}, "page_size 1001 is out of range"},
		"garbage token":     {"things", "f1", req{token: "not-a-token"}, "not a token of this list"},
		"another list":      {"others", "f1", req{token: tok}, "not a token of this list"},
		"other filters":     {"things", "f2", req{token: tok}, "other filters"},
		"forged body":       {"things", "f1", req{token: body + "x." + sig}, "not a token of this list"},
		"another key":       {"things", "f1", req{token: mustToken(t, paging.NewTokens([]byte("other")), cli)}, "not a token of this list"},
		"truncated":         {"things", "f1", req{token: tok[:len(tok)-2]}, "not a token of this list"},
		"signature only":    {"things", "f1", req{token: "." + sig}, "not a token of this list"},
	} {
		_, err := tokens.Open(r.list, "/things/", r.filters, r.req)
		if !errdefs.IsInvalid(err) || !strings.Contains(err.Error(), r.want) {
			t.Errorf("%s: %v, want InvalidArgument saying %q", name, err, r.want)
		}
	}
	if p, err := tokens.Open("things", "/things/", "f1", req{token: tok}); err != nil || p.Size() != paging.DefaultSize {
		t.Fatalf("the token itself: %v", err)
	}
}

// mustToken is a first page's token of "things" signed with tokens.
func mustToken(t *testing.T, tokens *paging.Tokens, kv clientv3.KV) string {
	t.Helper()
	p, _ := tokens.Open("things", "/things/", "f1", req{size: 1})
	tok, err := p.Scan(context.Background(), kv, func(kvs []*mvccpb.KeyValue, _ int64) (int, error) { return len(kvs), nil })
	if err != nil || tok == "" {
		t.Fatal(tok, err)
	}
	return tok
}
