package store_test

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"math"
	"regexp"
	"strconv"
	"strings"
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/docsync"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestKeyLayoutIsComplete: every key prefix constant of keys.go has a row
// in store.Layout, every row's pattern starts with its prefix, and the key
// functions build keys of the shape the rows show.
func TestKeyLayoutIsComplete(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "keys.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]store.KeySpec{}
	for _, k := range store.Layout {
		rows[k.Prefix] = k
		if !strings.HasPrefix(store.Prefix+k.Pattern, k.Prefix) {
			t.Errorf("row %s does not start with its prefix %s", k.Pattern, k.Prefix)
		}
	}
	umbrella := map[string]bool{"Prefix": true, "HostPrefix": true} // prefixes of other rows' prefixes
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, spec := range g.Specs {
			vs := spec.(*ast.ValueSpec)
			for i, name := range vs.Names {
				if !strings.HasSuffix(name.Name, "Prefix") || umbrella[name.Name] {
					continue
				}
				bin, ok := vs.Values[i].(*ast.BinaryExpr)
				if !ok {
					t.Fatalf("%s is not Prefix + \"...\"", name.Name)
				}
				lit, _ := strconv.Unquote(bin.Y.(*ast.BasicLit).Value)
				if _, ok := rows[store.Prefix+lit]; !ok {
					t.Errorf("key prefix %s (%q) has no row in store.Layout", name.Name, lit)
				}
			}
		}
	}
	samples := map[string]string{
		store.VMSpecPrefix:      store.VMSpecKey("id"),
		store.VMStatusPrefix:    store.VMStatusKey("id"),
		store.VMUserDataPrefix:  store.VMUserDataKey("id"),
		store.VMNamePrefix:      store.VMNameKey("p", "n"),
		store.VMRequestPrefix:   store.VMRequestKey("p", "r"),
		store.VMEventPrefix:     store.VMEventKey("id", 2),
		store.VMEventSeqPrefix:  store.VMEventSeqKey("id"),
		store.ImagePrefix:       store.ImageKey("n"),
		store.FlavorPrefix:      store.FlavorKey("n"),
		store.NetworkPrefix:     store.NetworkKey("p", "n"),
		store.ServerGroupPrefix: store.ServerGroupKey("p", "n"),
		store.HostSpecPrefix:    store.HostSpecKey("h"),
		store.HostAlivePrefix:   store.HostAliveKey("h"),
		store.HostAllocPrefix:   store.HostAllocKey("h"),
		store.HostDownPrefix:    store.HostDownKey("h"),
		store.HostFencedPrefix:  store.HostFencedKey("h"),
		store.ReleasedPrefix:    store.HostReleasedKey("h", "id"),
		store.ClaimPrefix:       store.ClaimKey("h", "id"),
		store.IPAMPrefix:        store.IPAMKey("net", "10.0.0.2"),
		store.VNIPrefix:         store.VNIKey(4711),
		store.PortForwardPrefix: store.PortForwardKey(minicloudv1.PortProtocol_PORT_PROTOCOL_UDP, 20053),
		store.SchedulerPrefix:   store.SchedulerKey("r"),
		store.QuotaUsagePrefix:  store.QuotaUsageKey("p"),
		store.QuotaLimitsPrefix: store.QuotaLimitsKey("p"),
		store.CAKey:             store.CAKey,
		store.JoinTokenPrefix:   store.JoinTokenKey("abcdef"),
		store.HostCertPrefix:    store.HostCertKey("h", "0a1b"),
		store.RevokedPrefix:     store.RevokedKey("0a1b"),
		store.ProjectPrefix:     store.ProjectKey("p"),
		store.UserPrefix:        store.UserKey("u"),
		store.TokenPrefix:       store.TokenKey("u", "id"),
		store.AuditPrefix:       store.AuditPrefix + "00000000001700000000-0a1b2c3d",
		store.IdentityKeyPrefix: store.IdentityKeyKey("kid0"),
		// The mutex of go.etcd.io/etcd/client/v3/concurrency names its
		// key after the session's lease, in hex.
		store.ImageStoreLockPrefix: store.ImageStoreLockPrefix + "694d7f3a",
		store.ImageUploadPrefix:    store.ImageUploadKey(".upload-0a1b"),
	}
	placeholder := regexp.MustCompile(`<[^>]+>`)
	for prefix, key := range samples {
		row, ok := rows[prefix]
		if !ok {
			t.Errorf("no row for %s", prefix)
			continue
		}
		// A placeholder stands for one dash-free word (the samples use
		// such words), so "<seq>" does not pass for "<unix-nanos>-<seq>".
		re := "^" + placeholder.ReplaceAllString(regexp.QuoteMeta(store.Prefix+row.Pattern), `[^/-]+`) + "$"
		if !regexp.MustCompile(re).MatchString(key) {
			t.Errorf("key %s does not have the shape of row %s", key, row.Pattern)
		}
	}
	if len(samples) != len(store.Layout) {
		t.Errorf("%d samples for %d rows: add one for the new row", len(samples), len(store.Layout))
	}
}

// TestKeyTableInDocs: docs/architecture.md shows store.MarkdownKeyTable
// between its markers.
func TestKeyTableInDocs(t *testing.T) {
	docsync.Check(t, "../../docs/architecture.md", "key table", store.MarkdownKeyTable())
}

// TestVMEventKeyIsZeroPadded: event keys carry seq in 20 digits, so they
// sort in append order (VMEventKey builds them without fmt).
func TestVMEventKeyIsZeroPadded(t *testing.T) {
	for _, seq := range []int64{0, 2, 255, 256, 123456789, math.MaxInt64} {
		want := fmt.Sprintf("%s%020d", store.VMEventsPrefix("vm-1"), seq)
		if got := store.VMEventKey("vm-1", seq); got != want {
			t.Errorf("VMEventKey(vm-1, %d) = %q, want %q", seq, got, want)
		}
	}
	if a, b := store.VMEventKey("vm-1", 9), store.VMEventKey("vm-1", 10); a >= b {
		t.Errorf("%q sorts after %q", a, b)
	}
}
