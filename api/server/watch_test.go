package server_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	apiserver "github.com/minicloud/minicloud/api/server"
)

type seen struct {
	typ   minicloudv1.WatchEventType
	name  string
	phase minicloudv1.VMPhase
	power minicloudv1.PowerState
	rev   int64
}

func (s seen) String() string {
	return fmt.Sprintf("%s %s %s %s", s.typ.String()[17:], s.name, s.phase.String()[9:], s.power.String()[12:])
}

func recvWatch(t *testing.T, stream minicloudv1.VMService_WatchVMsClient, n int) []seen {
	t.Helper()
	var out []seen
	for range n {
		ev, err := stream.Recv()
		if err != nil {
			t.Fatalf("after %v: %v", out, err)
		}
		out = append(out, seen{ev.Type, ev.Vm.GetMeta().GetName(), ev.Vm.GetStatus().GetPhase(), ev.Vm.GetSpec().GetPowerState(), ev.ResourceVersion})
	}
	return out
}

func TestWatchDeliversEveryChangeInOrder(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	web1 := e.createVM("web1")

	wctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	all, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	only1, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	first := recvWatch(t, all, 1)
	if first[0].String() != "ADDED web1 PENDING RUNNING" {
		t.Fatalf("initial state %v", first)
	}
	recvWatch(t, only1, 1)
	start := first[0].rev

	e.createVM("web2")
	if _, err := e.vms.StopVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	e.place(web1.Meta.Id, "h1")
	for _, p := range []minicloudv1.VMPhase{minicloudv1.VMPhase_VM_PHASE_CREATING, minicloudv1.VMPhase_VM_PHASE_STOPPED} {
		if _, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: web1.Meta.Id,
			Status: &minicloudv1.VMStatus{Phase: p}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hosts.ReportVMStatus(ctx(t), &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: web1.Meta.Id, Deleted: true}); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"ADDED web2 PENDING RUNNING",
		"MODIFIED web1 PENDING STOPPED",
		"MODIFIED web1 SCHEDULED STOPPED",
		"MODIFIED web1 CREATING STOPPED",
		"MODIFIED web1 STOPPED STOPPED",
		"DELETED web2 PENDING RUNNING",
		"MODIFIED web1 DELETING STOPPED",
		"DELETED web1 DELETING STOPPED",
	}
	check := func(name string, got []seen, want []string, after int64) {
		t.Helper()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s watch saw\n%v\nwant\n%v", name, got, want)
		}
		for _, s := range got {
			if s.rev <= after {
				t.Fatalf("%s watch: revisions not increasing: %v", name, got)
			}
			after = s.rev
		}
	}
	check("all", recvWatch(t, all, len(want)), want, start)
	var web1Only []string
	for _, w := range want {
		if strings.Contains(w, " web1 ") {
			web1Only = append(web1Only, w)
		}
	}
	check("name", recvWatch(t, only1, len(web1Only)), web1Only, start)

	// Resuming from a resource version replays exactly what followed it.
	resumed, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{ResourceVersion: start})
	if err != nil {
		t.Fatal(err)
	}
	check("resumed", recvWatch(t, resumed, len(want)), want, start)

	future, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{ResourceVersion: 1 << 40})
	if err != nil {
		t.Fatal(err)
	}
	_, err = future.Recv()
	wantCode(t, err, codes.InvalidArgument, "in the future")
}

// TestStopEndsWatchStreams: a stopping server ends its watches with
// UNAVAILABLE (clients resume elsewhere) instead of hanging the shutdown.
func TestStopEndsWatchStreams(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createVM("web1")
	stream, err := e.vms.WatchVMs(ctx(t), &minicloudv1.WatchVMsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	recvWatch(t, stream, 1)
	stopped := make(chan struct{})
	go func() {
		e.srv.Stop(ctx(t)) // would wait for the stream forever without the fix
		close(stopped)
	}()
	_, err = stream.Recv()
	wantCode(t, err, codes.Unavailable, "shutting down: watch again from resource_version")
	<-stopped
}

// TestWatchFromCompactedVersion: history etcd no longer has is ABORTED,
// telling the client to list again (watch from 0).
func TestWatchFromCompactedVersion(t *testing.T) {
	e := newEnv(t)
	e.seed()
	old := e.createVM("web1").Meta.ResourceVersion
	e.createVM("web2")
	if _, err := e.etcd.Compact(ctx(t), e.rev()); err != nil {
		t.Fatal(err)
	}
	stream, err := e.vms.WatchVMs(ctx(t), &minicloudv1.WatchVMsRequest{ResourceVersion: old})
	if err != nil {
		t.Fatal(err)
	}
	_, err = stream.Recv()
	wantCode(t, err, codes.Aborted, "is too old")
	wantCode(t, err, codes.Aborted, "watch again from 0")
}

// The API server keeps one copy of the VMs and the last changes for every
// stream: a watch resumes from any revision those changes cover, and one
// older than them is told to watch again from 0.
func TestWatchHistoryIsBounded(t *testing.T) {
	defer apiserver.SetVMHistory(6)()
	e := newEnv(t)
	e.seed()
	wctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	// The first stream starts the cache (its history begins here).
	first, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var revs []int64
	for i := range 10 {
		revs = append(revs, e.createVM(fmt.Sprintf("web%d", i)).Meta.ResourceVersion)
		// A reader that keeps up never falls behind, however short the
		// history.
		if got := recvWatch(t, first, 1); got[0].name != fmt.Sprintf("web%d", i) || got[0].rev != revs[i] {
			t.Fatalf("first stream: %v", got)
		}
	}
	// The last 6 changes are kept: resuming after the 4th create replays 6.
	resumed, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{ResourceVersion: revs[3]})
	if err != nil {
		t.Fatal(err)
	}
	if got := recvWatch(t, resumed, 6); got[0].name != "web4" || got[5].name != "web9" {
		t.Fatalf("resumed: %v", got)
	}
	old, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{ResourceVersion: revs[2]})
	if err != nil {
		t.Fatal(err)
	}
	_, err = old.Recv()
	wantCode(t, err, codes.Aborted, "is too old")

	// A revision the cache has not seen (no VM changed since) is not in
	// the future: the stream waits for what follows.
	e.createProjects("later")
	now := e.rev()
	fresh, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{ResourceVersion: now})
	if err != nil {
		t.Fatal(err)
	}
	e.createVM("web10")
	if got := recvWatch(t, fresh, 1); got[0].String() != "ADDED web10 PENDING RUNNING" {
		t.Fatalf("after a revision the cache had not seen: %v", got)
	}

	// Many streams see the same changes.
	var streams []minicloudv1.VMService_WatchVMsClient
	for range 20 {
		s, err := e.vms.WatchVMs(wctx, &minicloudv1.WatchVMsRequest{Name: "web10"})
		if err != nil {
			t.Fatal(err)
		}
		recvWatch(t, s, 1) // ADDED web10
		streams = append(streams, s)
	}
	if _, err := e.vms.StopVM(ctx(t), &minicloudv1.VMActionRequest{Name: "web10"}); err != nil {
		t.Fatal(err)
	}
	for i, s := range streams {
		if got := recvWatch(t, s, 1); got[0].String() != "MODIFIED web10 PENDING STOPPED" {
			t.Fatalf("stream %d: %v", i, got)
		}
	}
}
