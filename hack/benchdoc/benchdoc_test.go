package benchdoc

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRewriteSectionTouchesOnlyItsOwn(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.md")
	in := "# B\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n<!-- BEGIN b -->\nold b\n<!-- END b -->\n"
	if err := os.WriteFile(p, []byte(in), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := RewriteSection(p, "a", "new a"); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	want := "# B\n<!-- BEGIN a -->\nnew a\n<!-- END a -->\n<!-- BEGIN b -->\nold b\n<!-- END b -->\n"
	if string(got) != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	if err := RewriteSection(p, "c", "x"); err == nil {
		t.Fatal("a missing section was not reported")
	}
}

func TestCounts(t *testing.T) {
	got, err := Counts(" 10, 50,")
	if err != nil || len(got) != 2 || got[0] != 10 || got[1] != 50 {
		t.Fatalf("Counts: %v %v", got, err)
	}
	if none, err := Counts(""); err != nil || len(none) != 0 {
		t.Fatalf("Counts(\"\"): %v %v", none, err)
	}
	for _, bad := range []string{"0", "10,x", "-1"} {
		if _, err := Counts(bad); err == nil {
			t.Fatalf("Counts(%q) accepted", bad)
		}
	}
}
