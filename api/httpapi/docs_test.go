package httpapi_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/minicloud/minicloud/api/httpapi"
	"github.com/minicloud/minicloud/pkg/client"
)

// example is one command of docs/api.md's HTTP/JSON section and the
// answer the page says it gets.
type example struct {
	line    int    // of the command block, for messages
	command string // shell, with $WEB, $CA and $TOKEN
	code    int    // HTTP status
	body    any    // JSON the response must contain (nil: not checked)
}

// docExamples reads the ```sh blocks of the "## HTTP/JSON" section that
// run curl, each with the ``` block after it that starts "HTTP/1.1 CODE"
// and may go on with JSON. A curl block without one is an error: every
// example on the page is checked.
//
// The section's one sh block without curl is the setup the examples need
// ($WEB, $CA, $TOKEN), returned as setup.
func docExamples(t *testing.T, path string) (setup string, examples []example) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type block struct {
		line      int
		lang, txt string
	}
	var blocks []block
	var cur *block
	in := false
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, "## "):
			in = l == "## HTTP/JSON"
		case !in:
		case strings.HasPrefix(l, "```") && cur == nil:
			cur = &block{line: n, lang: strings.TrimPrefix(l, "```")}
		case strings.HasPrefix(l, "```"):
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			cur.txt += l + "\n"
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	var out []example
	for i, b := range blocks {
		if b.lang == "sh" && !strings.Contains(b.txt, "curl ") {
			if setup != "" {
				t.Fatalf("%s:%d: a second sh block without curl: one setup block, then examples", path, b.line)
			}
			setup = b.txt
		}
		if b.lang != "sh" || !strings.Contains(b.txt, "curl ") {
			continue
		}
		if i+1 == len(blocks) || !strings.HasPrefix(blocks[i+1].txt, "HTTP/1.1 ") {
			t.Fatalf("%s:%d: a curl example without its answer (a ``` block starting HTTP/1.1 CODE) after it", path, b.line)
		}
		status, rest, _ := strings.Cut(blocks[i+1].txt, "\n")
		code, err := strconv.Atoi(strings.Fields(status)[1])
		if err != nil {
			t.Fatalf("%s:%d: status line %q: %v", path, blocks[i+1].line, status, err)
		}
		ex := example{line: b.line, command: b.txt, code: code}
		if strings.TrimSpace(rest) != "" {
			if err := json.Unmarshal([]byte(rest), &ex.body); err != nil {
				t.Fatalf("%s:%d: the answer is not JSON: %v", path, blocks[i+1].line, err)
			}
		}
		out = append(out, ex)
	}
	return setup, out
}

// contains reports where got lacks something of want: every key of an
// object, every element of an array (same length), every scalar equal; a
// string ending in "..." matches any string that begins with the rest.
func contains(want, got any, at string) error {
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: want an object, got %v", at, got)
		}
		for k, v := range w {
			gv, ok := g[k]
			if !ok {
				return fmt.Errorf("%s.%s: missing", at, k)
			}
			if err := contains(v, gv, at+"."+k); err != nil {
				return err
			}
		}
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(w) {
			return fmt.Errorf("%s: want %d elements, got %v", at, len(w), got)
		}
		for i := range w {
			if err := contains(w[i], g[i], fmt.Sprintf("%s[%d]", at, i)); err != nil {
				return err
			}
		}
	case string:
		if g, ok := got.(string); ok {
			if p, cut := strings.CutSuffix(w, "..."); cut && strings.HasPrefix(g, p) || g == w {
				return nil
			}
		}
		return fmt.Errorf("%s: want %q, got %v", at, w, got)
	default:
		if !reflect.DeepEqual(want, got) {
			return fmt.Errorf("%s: want %v, got %v", at, want, got)
		}
	}
	return nil
}

// TestDocsCurlExamples runs docs/api.md's HTTP/JSON examples, in order,
// with the real curl against a real API server, and checks each status
// and every field the page shows.
func TestDocsCurlExamples(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatalf("curl: %v (hack/setup-host.sh installs it)", err)
	}
	path := filepath.Join("..", "..", "docs", "api.md")
	setup, examples := docExamples(t, path)
	if len(examples) < 8 {
		t.Fatalf("%s has %d curl examples in its HTTP/JSON section", path, len(examples))
	}
	w := startWeb(t, httpapi.Config{})
	dir := t.TempDir()

	// The setup block finds the token in the CLI's configuration (as make
	// up installs it) where the page says.
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(filepath.Join(home, ".config", "minicloud"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := (client.Config{Endpoint: "127.0.0.1:8640", CA: "/var/lib/minicloud/ca.crt", Token: w.api.AdminToken}).Write(filepath.Join(home, ".config", "minicloud", "config.yaml")); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "-c", "set -euo pipefail\n"+setup+`printf %s "$TOKEN"`)
	cmd.Env = append(os.Environ(), "HOME="+home)
	if out, err := cmd.Output(); err != nil || string(out) != w.api.AdminToken {
		t.Fatalf("%s: the setup block gives TOKEN %q (%v), want the config's token", path, out, err)
	}

	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, w.api.CA.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	bodyFile, codeFile := filepath.Join(dir, "body"), filepath.Join(dir, "code")
	// curl as the page writes it, with its answer sent to files.
	prelude := fmt.Sprintf("set -euo pipefail\ncurl() { %q \"$@\" -o %q -w '%%{http_code}' >%q; }\n", curl, bodyFile, codeFile)
	for _, ex := range examples {
		cmd := exec.Command("bash", "-c", prelude+ex.command)
		cmd.Env = append(os.Environ(), "WEB="+w.url, "CA="+ca, "TOKEN="+w.api.AdminToken)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s:%d: %v: %s", path, ex.line, err, out)
		}
		codeText, err := os.ReadFile(codeFile)
		if err != nil {
			t.Fatal(err)
		}
		body, err := os.ReadFile(bodyFile)
		if err != nil {
			t.Fatal(err)
		}
		if code, _ := strconv.Atoi(string(codeText)); code != ex.code {
			t.Fatalf("%s:%d: status %s, the page says %d: %s", path, ex.line, codeText, ex.code, body)
		}
		if ex.body == nil {
			continue
		}
		var got any
		if err := json.Unmarshal(body, &got); err != nil {
			t.Fatalf("%s:%d: answer is not JSON: %v: %s", path, ex.line, err, body)
		}
		if err := contains(ex.body, got, "body"); err != nil {
			t.Errorf("%s:%d: %v\nwhole answer: %s", path, ex.line, err, body)
		}
	}
}
