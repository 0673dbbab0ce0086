// Package docsync keeps generated sections of the docs equal to the code
// they are generated from. A section sits between two HTML comments,
//
//	<!-- NAME: begin (anything to the end of the line) -->
//	...
//	<!-- NAME: end -->
//
// and a test of the package that owns the table calls Check. With
// DOCSYNC_UPDATE=1 in the environment, Check rewrites the section instead of
// failing (run the owning package's tests once after changing the code).
package docsync

import (
	"os"
	"strings"
	"testing"
)

// Check fails t unless the section name of the markdown file path is want.
// On failure it prints want, ready to paste.
func Check(t testing.TB, path, name, want string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	begin, end := "<!-- "+name+": begin", "<!-- "+name+": end -->"
	i := strings.Index(doc, begin)
	if i < 0 {
		t.Fatalf("%s has no %q marker", path, begin)
	}
	nl := strings.IndexByte(doc[i:], '\n')
	j := strings.Index(doc, end)
	if nl < 0 || j < i+nl {
		t.Fatalf("%s: section %s has no end marker %q", path, name, end)
	}
	if got := doc[i+nl+1 : j]; got != want {
		if os.Getenv("DOCSYNC_UPDATE") == "1" {
			updated := doc[:i+nl+1] + want + doc[j:]
			if err := os.WriteFile(path, []byte(updated), 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: section %s rewritten from the code", path, name)
			return
		}
		t.Fatalf("%s: section %s differs from the code; replace it with:\n%s", path, name, want)
	}
}
