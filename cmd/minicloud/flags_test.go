package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// runCLI runs the CLI in-process with no server reachable and returns the
// exit code and stderr.
func runCLI(t *testing.T, env map[string]string, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	getenv := func(k string) string { return env[k] }
	code := run(context.Background(), args, streams{in: strings.NewReader(stdin), out: &out, errOut: &errOut}, getenv)
	return code, out.String(), errOut.String()
}

func TestUsageErrorsExitTwo(t *testing.T) {
	for _, args := range [][]string{
		{"bogus"},
		{"vm", "bogus"},
		{"vm", "create"},
		{"vm", "create", "web1"},
		{"vm", "create", "web1", "--image", "x"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--timeout", "0s"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--user-data", "@/nonexistent/file"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--ssh-key", "/nonexistent/key"},
		{"vm", "show"},
		{"vm", "show", "a", "b"},
		{"vm", "list", "-o", "xml"},
		{"vm", "wait", "web1"},
		{"vm", "wait", "web1", "--for", "happy"},
		{"flavor", "create", "small", "--vcpus", "one"},
		{"flavor", "create", "small", "--vcpus", "1"},
		{"network", "create", "net"},
		{"server-group", "create", "g", "--policy", "spread"},
		{"image", "create", "img"},
		{"image", "create", "img", "--file", "/nonexistent/disk"},
		{"image", "create", "img", "--file", "x", "--initrd", "y"},
		{"image", "create", "img", "--file", "x", "--format", "vmdk"},
		{"flavor", "list", "--no-such-flag"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--label", "novalue"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--metadata", "k=1", "--metadata", "k=2"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--metadata-from-file", "k=/nonexistent/file"},
		{"vm", "set", "web1"},
		{"vm", "set", "web1", "--metadata", "=v"},
		{"vm", "set", "web1", "--add-ssh-key", "/nonexistent/key"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--on-host-failure", "migrate"},
		{"vm", "create", "web1", "--image", "x", "--flavor", "y", "--restart-policy", "always"},
		{"host", "fence", "h1"},
		{"host", "fence", "h1", "--reason", "powered off"},
		{"host", "evacuate"},
		{"host", "delete"},
	} {
		code, stdout, stderr := runCLI(t, nil, "", append([]string{"--endpoint", "127.0.0.1:1"}, args...)...)
		if code != exitUsage {
			t.Errorf("%v: exit %d, want %d (stderr %q)", args, code, exitUsage, stderr)
		}
		if !strings.HasPrefix(stderr, "minicloud: ") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%v: stderr %q is not one 'minicloud: ' line", args, stderr)
		}
		if stdout != "" {
			t.Errorf("%v: wrote %q to stdout", args, stdout)
		}
	}
}

func TestUnreachableAPIExitsSix(t *testing.T) {
	code, _, stderr := runCLI(t, nil, "", "--endpoint", "127.0.0.1:1", "flavor", "list")
	if code != exitUnavailable || !strings.Contains(stderr, "cannot reach the minicloud API at 127.0.0.1:1") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
}

func TestEndpointAndProjectResolution(t *testing.T) {
	cfgDir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(cfgDir, "minicloud"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfgDir, "minicloud", "config.yaml"), []byte("endpoint: 10.0.0.1:8640\nproject: fromfile\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		flags        []string
		env          map[string]string
		wantEndpoint string
		wantProject  string
	}{
		// No project chosen: "" lets the API use the caller's default project.
		{"defaults", nil, map[string]string{"HOME": t.TempDir()}, "127.0.0.1:8640", ""},
		{"config file", nil, map[string]string{"XDG_CONFIG_HOME": cfgDir}, "10.0.0.1:8640", "fromfile"},
		{"env over config", nil, map[string]string{"XDG_CONFIG_HOME": cfgDir, "MINICLOUD_ENDPOINT": "10.0.0.2:1", "MINICLOUD_PROJECT": "envp"}, "10.0.0.2:1", "envp"},
		{"flag over env", []string{"--endpoint", "10.0.0.3:1", "--project", "flagp"}, map[string]string{"XDG_CONFIG_HOME": cfgDir, "MINICLOUD_ENDPOINT": "10.0.0.2:1"}, "10.0.0.3:1", "flagp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &app{getenv: func(k string) string { return tc.env[k] }}
			root := a.newRootCommand()
			if err := root.ParseFlags(tc.flags); err != nil {
				t.Fatal(err)
			}
			ep, proj, err := a.settings()
			if err != nil {
				t.Fatal(err)
			}
			if ep != tc.wantEndpoint || proj != tc.wantProject {
				t.Fatalf("got %s %s, want %s %s", ep, proj, tc.wantEndpoint, tc.wantProject)
			}
		})
	}
	for _, bad := range []string{
		"endpiont: typo\n",
		"endpoint: 10.0.0.1:1\nendpoints: [10.0.0.2:1]\n",
		"endpoints: [\"10.0.0.1:1,10.0.0.2:1\"]\n",
	} {
		p := filepath.Join(t.TempDir(), "bad.yaml")
		os.WriteFile(p, []byte(bad), 0o644)
		a := &app{getenv: func(k string) string { return map[string]string{"MINICLOUD_CONFIG": p}[k] }}
		if _, _, err := a.settings(); exitCode(err) != exitUsage {
			t.Errorf("config %q: got %v, want a usage error", bad, err)
		}
	}
}

// TestEndpointsList: a list of API replicas in the config file becomes the
// comma-separated endpoint the client dials; flag and env take lists too.
func TestEndpointsList(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(p, []byte("endpoints:\n  - 10.0.0.1:8640\n  - 10.0.0.2:8640\n"), 0o644)
	a := &app{getenv: func(k string) string { return map[string]string{"MINICLOUD_CONFIG": p}[k] }}
	ep, _, err := a.settings()
	if err != nil || ep != "10.0.0.1:8640,10.0.0.2:8640" {
		t.Fatalf("got %q, %v; want both replicas", ep, err)
	}
	// Two unreachable replicas: the error names both and exits 6.
	code, _, stderr := runCLI(t, nil, "", "--endpoint", "127.0.0.1:1,127.0.0.1:2", "flavor", "list")
	if code != exitUnavailable || !strings.Contains(stderr, "127.0.0.1:1,127.0.0.1:2") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = runCLI(t, nil, "", "--endpoint", "127.0.0.1:1,nonsense", "flavor", "list")
	if code != exitUsage || !strings.Contains(stderr, "nonsense") {
		t.Fatalf("bad endpoint in list: exit %d, stderr %q", code, stderr)
	}
}

func TestCreateRequestFromFlags(t *testing.T) {
	dir := t.TempDir()
	ud := filepath.Join(dir, "init.yaml")
	os.WriteFile(ud, []byte("#cloud-config\nhostname: x\n"), 0o644)
	keys := filepath.Join(dir, "keys.pub")
	os.WriteFile(keys, []byte("# mine\nssh-ed25519 AAAAC3Nza one@x\n\nssh-rsa AAAAB3Nz two@y\n"), 0o644)

	build := func(stdin string, args ...string) *minicloudv1.CreateVMRequest {
		t.Helper()
		a := &app{getenv: func(string) string { return "" }, streams: streams{in: strings.NewReader(stdin)}}
		return createRequest(t, a, args...)
	}

	req := build("", "web1", "--image", "debian", "--flavor", "small", "--network", "a", "--network", "b",
		"--ssh-key", keys, "--user-data", "@"+ud, "--config-drive", "--az", "z1", "--server-group", "g", "--project", "p1")
	s := req.GetSpec()
	if req.GetName() != "web1" || req.GetProject() != "p1" || s.GetImage() != "debian" || s.GetFlavor() != "small" ||
		strings.Join(s.GetNetworks(), ",") != "a,b" || len(s.GetSshPublicKeys()) != 2 || !s.GetConfigDrive() ||
		s.GetAvailabilityZone() != "z1" || s.GetServerGroup() != "g" || !strings.HasPrefix(string(req.GetUserData()), "#cloud-config") {
		t.Fatalf("request %v", req)
	}
	if len(req.GetRequestId()) != 36 {
		t.Fatalf("request id %q is not a uuid", req.GetRequestId())
	}
	if other := build("", "web1", "--image", "i", "--flavor", "f"); other.GetRequestId() == req.GetRequestId() {
		t.Fatal("two creates share a request id")
	}
	if r := build("", "web1", "--image", "i", "--flavor", "f", "--user-data", ud); string(r.GetUserData()) != "#cloud-config\nhostname: x\n" {
		t.Fatalf("--user-data FILE: %q", r.GetUserData())
	}
	if r := build("from stdin", "web1", "--image", "i", "--flavor", "f", "--user-data", "-"); string(r.GetUserData()) != "from stdin" {
		t.Fatalf("--user-data -: %q", r.GetUserData())
	}
	if r := build("", "web1", "--image", "i", "--flavor", "f"); r.GetUserData() != nil {
		t.Fatal("user-data without --user-data")
	}
}

// TestHostFailureFlags: the policy words map to their enums, a missing
// flag leaves the server's default, a wrong word lists the choices, and
// host fence without --confirm explains what it would assert.
func TestHostFailureFlags(t *testing.T) {
	a := &app{getenv: func(string) string { return "" }}
	s := createRequest(t, a, "web1", "--image", "i", "--flavor", "f", "--on-host-failure", "evacuate", "--restart-policy", "never").GetSpec()
	if s.GetOnHostFailure() != minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_EVACUATE || s.GetRestartPolicy() != minicloudv1.RestartPolicy_RESTART_POLICY_NEVER {
		t.Fatalf("spec %v", s)
	}
	s = createRequest(t, a, "web1", "--image", "i", "--flavor", "f", "--on-host-failure", "STOP", "--restart-policy", "on-failure").GetSpec()
	if s.GetOnHostFailure() != minicloudv1.HostFailurePolicy_HOST_FAILURE_POLICY_STOP || s.GetRestartPolicy() != minicloudv1.RestartPolicy_RESTART_POLICY_ON_FAILURE {
		t.Fatalf("spec %v", s)
	}
	s = createRequest(t, a, "web1", "--image", "i", "--flavor", "f").GetSpec()
	if s.GetOnHostFailure() != 0 || s.GetRestartPolicy() != 0 {
		t.Fatalf("defaults are the server's: %v", s)
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"vm", "create", "w", "--image", "x", "--flavor", "y", "--on-host-failure", "migrate"}, []string{`--on-host-failure "migrate": choose one of stop, evacuate`}},
		{[]string{"vm", "create", "w", "--image", "x", "--flavor", "y", "--restart-policy", "always"}, []string{`--restart-policy "always": choose one of on-failure, never`}},
		{[]string{"host", "fence", "h1"}, []string{"runs none of its VMs", "power the host off", "--confirm"}},
	} {
		code, _, stderr := runCLI(t, nil, "", append([]string{"--endpoint", "127.0.0.1:1"}, tc.args...)...)
		for _, w := range tc.want {
			if code != exitUsage || !strings.Contains(stderr, w) {
				t.Errorf("%v: exit %d, stderr %q lacks %q", tc.args, code, stderr, w)
			}
		}
	}
}

func TestPolicyNames(t *testing.T) {
	for _, s := range serverGroupPolicies {
		p, err := parsePolicy(s)
		if err != nil {
			t.Fatal(err)
		}
		if policyName(p) != s {
			t.Fatalf("%s -> %v -> %s", s, p, policyName(p))
		}
	}
}

func TestCompletionScript(t *testing.T) {
	code, out, stderr := runCLI(t, nil, "", "completion", "bash")
	if code != 0 || !strings.Contains(out, "__start_minicloud") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
}

// createRequest parses vm create's arguments (NAME first) and builds the
// request the command would send.
func createRequest(t *testing.T, a *app, args ...string) *minicloudv1.CreateVMRequest {
	t.Helper()
	cmd := &cobra.Command{Use: "create"}
	var o vmCreateOptions
	addVMCreateFlags(cmd, &o)
	cmd.Flags().AddFlagSet(a.newRootCommand().PersistentFlags()) // --project
	if err := cmd.ParseFlags(args); err != nil {
		t.Fatal(err)
	}
	req, err := a.buildCreateRequest(cmd, cmd.Flags().Arg(0), &o)
	if err != nil {
		t.Fatal(err)
	}
	return req
}
