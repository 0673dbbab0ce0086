// Package benchdoc updates docs/benchmarks.md: each harness owns the text
// between its <!-- BEGIN name --> and <!-- END name --> markers and
// rewrites only that.
package benchdoc

import (
	"fmt"
	"os"
	"strings"
)

// RewriteSection replaces the text between <!-- BEGIN name --> and
// <!-- END name --> in path with body.
func RewriteSection(path, name, body string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	begin, end := "<!-- BEGIN "+name+" -->\n", "<!-- END "+name+" -->"
	s := string(raw)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		return fmt.Errorf("%s: no %q ... %q markers", path, strings.TrimSpace(begin), end)
	}
	if !strings.HasSuffix(body, "\n") {
		body += "\n"
	}
	return os.WriteFile(path, []byte(s[:i+len(begin)]+body+s[j:]), 0o644)
}
