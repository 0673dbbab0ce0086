package agent_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/cloudtest"
)

var watchLine = regexp.MustCompile(`MINICLOUD-WATCH key=greeting changed=(true|false) etag=(\S*) value="([^"]*)"`)

// watchLines returns the guest probe's wait_for_change answers so far.
func watchLines(t *testing.T, c *cloudtest.Cloud, name string) [][]string {
	t.Helper()
	resp, err := c.Client.VMs.GetConsoleLog(context.Background(), &minicloudv1.GetConsoleLogRequest{Name: name, TailBytes: 1 << 20})
	if err != nil {
		t.Fatalf("console log of %s: %v", name, err)
	}
	return watchLine.FindAllStringSubmatch(string(resp.GetData()), -1)
}

// nextWatchLine polls the console (it has no event stream) until the
// guest printed more than have answers, and returns the new one and when
// it was first seen.
func nextWatchLine(t *testing.T, c *cloudtest.Cloud, name string, have int, within time.Duration) ([]string, time.Time) {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if lines := watchLines(t, c, name); len(lines) > have {
			return lines[have], time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the guest printed no wait_for_change answer #%d within %s; console lines: %q", have+1, within, watchLines(t, c, name))
	return nil, time.Time{}
}

// TestMetadataUpdateReachesWaitingGuest is the headline of live metadata:
// a real guest blocks on GCE's wait_for_change for an attribute, `minicloud
// vm set` changes it, and the guest's long-poll answers with the new value;
// the next long-poll, sent with the new ETag, holds until its timeout. The
// domain is never touched.
func TestMetadataUpdateReachesWaitingGuest(t *testing.T) {
	c := newTinyCloud(t)
	c.MustMC("vm", "create", "watcher", "--image", "tiny", "--flavor", "tiny",
		"--metadata", "mc-watch=greeting", "--metadata", "mc-watch-timeout=6", "--metadata", "greeting=hello",
		"--label", "env=test", "--tag", "web")
	vm := waitVM(t, c, "watcher", "running", phaseIs(minicloudv1.VMPhase_VM_PHASE_RUNNING))
	id := vm.GetMeta().GetId()
	domID, err := virsh("domid", "mc-"+id)
	if err != nil {
		t.Fatal(err)
	}

	// The probe prints the value it starts from, then blocks.
	first, _ := nextWatchLine(t, c, "watcher", 0, 4*time.Minute)
	if first[1] != "false" || first[3] != "hello" {
		t.Fatalf("first answer %q, want the value at create", first)
	}
	// Answers of timed-out polls may come in before the update; count them.
	have := len(watchLines(t, c, "watcher"))

	sent := time.Now()
	out := c.MustMC("vm", "set", "watcher", "--metadata", "greeting=world", "--label", "env=prod")
	returned := time.Now()
	if !strings.Contains(out, "vm watcher updated") {
		t.Fatalf("vm set said %q", out)
	}
	var got []string
	var seen time.Time
	for {
		got, seen = nextWatchLine(t, c, "watcher", have, time.Minute)
		have++
		if got[1] == "true" {
			break
		}
		if got[3] != "hello" {
			t.Fatalf("an unchanged answer with another value: %q", got)
		}
	}
	if got[3] != "world" || got[2] == first[2] {
		t.Fatalf("after vm set the guest saw %q, want value world with a new ETag", got)
	}
	t.Logf("update → guest's wait_for_change answer: %s after vm set was sent (it returned after %s; console polled every 20 ms)",
		seen.Sub(sent).Round(time.Millisecond), returned.Sub(sent).Round(time.Millisecond))

	// The next poll carries the new ETag: it answers only at its timeout
	// (6 s), unchanged.
	next, at := nextWatchLine(t, c, "watcher", have, time.Minute)
	have++
	if next[1] != "false" || next[2] != got[2] || next[3] != "world" {
		t.Fatalf("the poll after the change answered %q, want an unchanged timeout", next)
	}
	if held := at.Sub(seen); held < 5*time.Second {
		t.Fatalf("the poll with the current ETag answered after %s, before its 6 s timeout", held)
	}

	// And a further change ends a poll again.
	c.MustMC("vm", "set", "watcher", "--metadata", "greeting=again")
	for {
		got, _ = nextWatchLine(t, c, "watcher", have, time.Minute)
		have++
		if got[1] == "true" {
			break
		}
	}
	if got[3] != "again" {
		t.Fatalf("third value: %q", got)
	}

	// SSH keys too, by file and by fingerprint.
	keyFile := filepath.Join(c.DataDir, "key.pub")
	if err := os.WriteFile(keyFile, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl5Y2hEY9+0XnH8cS4Pn1Mo9h3KxG8nKJ9YVtq9GkR2 alice\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.MustMC("vm", "set", "watcher", "--add-ssh-key", keyFile, "--tag", "db", "--remove-tag", "web")
	show := c.MustMC("vm", "show", "watcher")
	for _, want := range []string{"env", "prod", "Tags:", "db", "greeting", "again", "SHA256:", "alice"} {
		if !strings.Contains(show, want) {
			t.Errorf("vm show lacks %q:\n%s", want, show)
		}
	}

	// The host reports each delivery; the domain is the same one, running.
	waitVM(t, c, "watcher", "metadata delivered", func(vm *minicloudv1.VM) bool {
		return vm.GetStatus().GetObservedMetadataVersion() == vm.GetMeta().GetResourceVersion()
	})
	events := c.MustMC("vm", "events", "watcher")
	if n := strings.Count(events, "MetadataUpdated"); n != 3 {
		t.Errorf("%d MetadataUpdated events, want 3:\n%s", n, events)
	}
	if !strings.Contains(events, "MetadataDelivered") {
		t.Errorf("no MetadataDelivered event:\n%s", events)
	}
	for _, bad := range []string{"Stopped", "StoppedByGuest", "Rebooted"} {
		if strings.Contains(events, bad) {
			t.Errorf("a metadata update touched the domain (%s):\n%s", bad, events)
		}
	}
	if now, err := virsh("domid", "mc-"+id); err != nil || now != domID {
		t.Errorf("domain id %q, was %q (%v): the domain was restarted", now, domID, err)
	}

	// Level-triggered delivery: the all-in-one (API, agent, metadata
	// service) is killed and started again. The guest resumes its poll with
	// the last ETag; the restarted agent serves the current value, so the
	// poll holds until its timeout and answers unchanged — a stale or
	// missing value would answer at once with another ETag or a 404.
	have = len(watchLines(t, c, "watcher"))
	c.Kill()
	c.Run()
	c.WaitHostUp()
	// The console is read through the restarted agent, which answers once
	// it has registered its new address and received its assignments.
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		_, err := c.Client.VMs.GetConsoleLog(context.Background(), &minicloudv1.GetConsoleLogRequest{Name: "watcher", TailBytes: 1})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the console is unreadable 2 minutes after the restart: %v", err)
		}
	}
	resumed, _ := nextWatchLine(t, c, "watcher", have, 3*time.Minute)
	have++
	if resumed[1] != "false" || resumed[2] != got[2] || resumed[3] != "again" {
		t.Fatalf("after the restart the guest's poll answered %q, want the unchanged value again with ETag %s", resumed, got[2])
	}
	c.MustMC("vm", "set", "watcher", "--metadata", "greeting=after-restart")
	for {
		got, _ = nextWatchLine(t, c, "watcher", have, time.Minute)
		have++
		if got[1] == "true" {
			break
		}
	}
	if got[3] != "after-restart" {
		t.Fatalf("after the restart, an update answered %q", got)
	}
	if now, err := virsh("domid", "mc-"+id); err != nil || now != domID {
		t.Errorf("domain id %q, was %q (%v) after the agent restart", now, domID, err)
	}
}
