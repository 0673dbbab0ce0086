package promcheck_test

// The metrics of real daemons: a minicloudd all-in-one (API, scheduler,
// agent and its metadata service, each on its own metrics listener) boots
// one tiny VM, so every labelled family has series, and its three /metrics
// are scraped. docs/operations.md's metrics table must be what they serve,
// and every query of docs/grafana/minicloud.json must find its series and
// labels there.

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
	"github.com/minicloud/minicloud/pkg/docsync"
	"github.com/minicloud/minicloud/pkg/lifecycle"
	"github.com/minicloud/minicloud/pkg/promcheck"
)

func TestMain(m *testing.M) {
	code := m.Run()
	cloudtest.RemoveBinaries()
	os.Exit(code)
}

// standardPrefixes are the families client_golang's Go and process
// collectors add to every daemon: documented as a group, since they change
// with the Go release, not with minicloud.
var standardPrefixes = []string{"go_", "process_"}

func TestDaemonMetricsDocsAndDashboard(t *testing.T) {
	cloudtest.RequireHypervisorHost(t)
	listen := map[string]string{
		"api":       cloudtest.FreeAddr(t),
		"scheduler": cloudtest.FreeAddr(t),
		"agent":     cloudtest.FreeAddr(t),
	}
	c := cloudtest.Start(t, "--metrics-listen", listen["api"],
		"--scheduler-metrics-listen", listen["scheduler"], "--agent-metrics-listen", listen["agent"])
	c.WaitHostUp()
	c.MustMC("network", "create", "default", "--cidr", fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(50), rand.IntN(250)))
	c.MustMC("flavor", "create", "tiny", "--vcpus", "1", "--memory-mib", "256", "--disk-gib", "1")
	c.ImportImage("tiny", cloudtest.TinyImage(t))
	c.MustMC("vm", "create", "m1", "--image", "tiny", "--flavor", "tiny")
	// GuestReady: the guest read its metadata, so the metadata service's
	// labelled families have series too.
	waitGuestReady(t, c, "m1")

	var e promcheck.Exposition
	for _, daemon := range []string{"api", "scheduler", "agent"} {
		if err := e.Add(daemon, strings.NewReader(scrape(t, listen[daemon]))); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range e.Families() {
		if !strings.HasPrefix(f.Name, "minicloud_") && !hasAnyPrefix(f.Name, standardPrefixes) {
			t.Errorf("%s (served by %s) is neither minicloud's nor a standard Go or process metric: name it minicloud_*", f.Name, strings.Join(f.Sources, ", "))
		}
	}
	docsync.Check(t, "../../docs/operations.md", "metrics table", e.MarkdownTable("minicloud_"))

	dash, err := os.Open("../../docs/grafana/minicloud.json")
	if err != nil {
		t.Fatal(err)
	}
	defer dash.Close()
	if err := e.CheckDashboard(dash); err != nil {
		t.Fatalf("docs/grafana/minicloud.json against the daemons' metrics:\n%v", err)
	}
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s/metrics: %s %v", addr, resp.Status, err)
	}
	return string(b)
}

// waitGuestReady follows the VM until its guest read its metadata, and
// fails if it goes to ERROR or never gets there.
func waitGuestReady(t *testing.T, c *cloudtest.Cloud, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	stream, err := c.Client.VMs.WatchVMs(ctx, &minicloudv1.WatchVMsRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			t.Fatalf("VM %s never became GuestReady: %v\nlog:\n%s", name, err, c.Log())
		}
		st := ev.GetVm().GetStatus()
		if st.GetPhase() == lifecycle.Error {
			t.Fatalf("VM %s went to ERROR: %s: %s\nlog:\n%s", name, st.GetReason(), st.GetMessage(), c.Log())
		}
		for _, cond := range st.GetConditions() {
			if cond.GetType() == lifecycle.ConditionGuestReady && cond.GetStatus() {
				return
			}
		}
	}
}
