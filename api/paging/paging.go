// Package paging is the pagination contract of every List RPC (Google's
// AIP-158, with Kubernetes' `continue` semantics for consistency):
// page_size (0: DefaultSize, at most MaxSize) and page_token in the
// request, next_page_token in the response, empty on the last page.
//
// A list reads etcd with a range limit, from just after the last key the
// previous page looked at, never the whole prefix; every page of one list
// reads the snapshot (etcd revision) of its first page, so a list that
// spans pages is consistent, as one read would be. Once etcd has compacted
// that revision the token fails with ABORTED: start again from the first
// page. Filters are applied while scanning; one call scans at most
// MaxScan keys and may return a short (even empty) page with a token.
//
// A token is opaque: the list it belongs to, a hash of the request's
// filters, the snapshot revision and the last key looked at (relative to
// the list's prefix), signed with an HMAC whose key every API replica
// derives from the cluster CA's key. A token of another list or other
// filters, a damaged or forged one, is refused with INVALID_ARGUMENT.
package paging

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

const (
	// DefaultSize is the page size of a request that gives none.
	DefaultSize = 500
	// MaxSize is the largest page size a request may ask for.
	MaxSize = 1000
	// MaxScan bounds the keys one call reads while filtering, so a
	// selective filter over a large list costs bounded work per call.
	MaxScan = 10 * MaxSize
)

// Request is what every paginated List request has.
type Request interface {
	GetPageSize() int32
	GetPageToken() string
}

// Tokens signs and checks page tokens.
type Tokens struct{ key []byte }

// NewTokens derives the signing key from secret (the cluster CA's private
// key, so every replica accepts every replica's tokens). A nil secret
// gets a random key: tokens are then good on this process only.
func NewTokens(secret []byte) *Tokens {
	if secret == nil {
		secret = make([]byte, 32)
		if _, err := rand.Read(secret); err != nil {
			panic(err)
		}
	}
	m := hmac.New(sha256.New, []byte("minicloud page tokens"))
	m.Write(secret)
	return &Tokens{key: m.Sum(nil)}
}

// token is what a page token carries.
type token struct {
	List   string `json:"l"`
	Filter string `json:"f"`
	Rev    int64  `json:"r"`
	After  string `json:"a"`
}

// Page is one call's position in a list.
type Page struct {
	tokens *Tokens
	list   string
	filter string
	prefix string
	size   int
	after  string
	rev    int64
	chunk  int
	stop   func() bool
}

// Chunked makes Scan read at most n keys at a time and end the page early
// (with a token) when stop says so after a chunk: for lists whose items
// can be large, so a page stays under a byte budget.
func (p *Page) Chunked(n int, stop func() bool) { p.chunk, p.stop = n, stop }

// Open checks req's page size and token for the list named list over the
// keys under prefix, with the request's filters in canonical form (any
// string that differs when they differ).
func (t *Tokens) Open(list, prefix, filters string, req Request) (*Page, error) {
	size := int(req.GetPageSize())
	switch {
	case size < 0 || size > MaxSize:
		return nil, errdefs.Invalid("page_size %d is out of range: give 1 to %d, or 0 for the default %d", size, MaxSize, DefaultSize)
	case size == 0:
		size = DefaultSize
	}
	sum := sha256.Sum256([]byte(filters))
	p := &Page{tokens: t, list: list, filter: hex.EncodeToString(sum[:8]), prefix: prefix, size: size}
	if req.GetPageToken() == "" {
		return p, nil
	}
	tok, err := t.decode(req.GetPageToken())
	if err != nil || tok.List != list || tok.Rev <= 0 {
		return nil, errdefs.Invalid("page_token is not a token of this list: send the next_page_token of the previous page unchanged, or none for the first page")
	}
	if tok.Filter != p.filter {
		return nil, errdefs.Invalid("page_token belongs to a list with other filters: keep every filter of the first page's request, or start again without a token")
	}
	p.after, p.rev = tok.After, tok.Rev
	return p, nil
}

func (t *Tokens) encode(tok token) string {
	body, _ := json.Marshal(tok)
	m := hmac.New(sha256.New, t.key)
	m.Write(body)
	enc := base64.RawURLEncoding
	return enc.EncodeToString(body) + "." + enc.EncodeToString(m.Sum(nil)[:16])
}

func (t *Tokens) decode(s string) (token, error) {
	var tok token
	b64, sig, ok := strings.Cut(s, ".")
	if !ok || len(s) > 4096 {
		return tok, errors.New("malformed")
	}
	enc := base64.RawURLEncoding
	body, err1 := enc.DecodeString(b64)
	mac, err2 := enc.DecodeString(sig)
	if err1 != nil || err2 != nil {
		return tok, errors.New("malformed")
	}
	m := hmac.New(sha256.New, t.key)
	m.Write(body)
	if !hmac.Equal(mac, m.Sum(nil)[:16]) {
		return tok, errors.New("bad signature")
	}
	return tok, json.Unmarshal(body, &tok)
}

// Size is the page size asked for.
func (p *Page) Size() int { return p.size }

// Rev is the snapshot the pages read (after Scan).
func (p *Page) Rev() int64 { return p.rev }

// Scan reads the keys after the token's position in chunks, at the list's
// snapshot, and hands each chunk to take, which returns how many of its
// keys it kept (a chunk is never larger than the room left in the page).
// It stops when the page is full, the keys run out or MaxScan keys were
// read, and returns the next page's token ("" after the last key).
func (p *Page) Scan(ctx context.Context, kv clientv3.KV, take func(kvs []*mvccpb.KeyValue, rev int64) (int, error)) (string, error) {
	end := store.PrefixEnd(p.prefix)
	kept, scanned := 0, 0
	after := p.after
	for {
		start := p.prefix
		if after != "" {
			start = p.prefix + after + "\x00"
		}
		limit := p.size - kept
		if p.chunk > 0 {
			limit = min(limit, p.chunk)
		}
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(int64(limit))}
		if p.rev > 0 {
			opts = append(opts, clientv3.WithRev(p.rev))
		}
		resp, err := kv.Get(ctx, start, opts...)
		if err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				return "", errdefs.Conflict("the list's snapshot (revision %d) was compacted: list again from the first page", p.rev)
			}
			return "", errdefs.Wrap(errdefs.KindUnavailable, err, "etcd list %s", p.prefix)
		}
		if p.rev == 0 {
			p.rev = resp.Header.Revision
		}
		if len(resp.Kvs) > 0 {
			n, err := take(resp.Kvs, p.rev)
			if err != nil {
				return "", err
			}
			kept += n
			scanned += len(resp.Kvs)
			after = strings.TrimPrefix(string(resp.Kvs[len(resp.Kvs)-1].Key), p.prefix)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return "", nil
		}
		if kept >= p.size || scanned >= MaxScan || (p.stop != nil && p.stop()) {
			return p.tokens.encode(token{List: p.list, Filter: p.filter, Rev: p.rev, After: after}), nil
		}
	}
}
