package server_test

import (
	"fmt"
	"strings"
	"testing"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

// A host that reports events without end cannot grow etcd: the log keeps
// the newest MaxVMEvents and counts the rest as dropped.
func TestVMEventLogIsCapped(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.registerHost("h1", "127.0.0.1:1")
	vm := e.createVM("web1") // its first event: Created
	e.place(vm.Meta.Id, "h1")
	c := ctx(t)
	total := 3 * store.MaxVMEvents
	for i := 0; i < total; i += 64 {
		var evs []*minicloudv1.Event
		for j := i; j < min(i+64, total); j++ {
			evs = append(evs, &minicloudv1.Event{Type: "Normal", Reason: "Tick", Message: fmt.Sprint(j)})
		}
		if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Events: evs}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := e.vms.ListVMEvents(c, &minicloudv1.ListVMEventsRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Events) != store.MaxVMEvents || resp.EventsDropped != int64(total+1-store.MaxVMEvents) {
		t.Fatalf("%d events, %d dropped; want %d and %d", len(resp.Events), resp.EventsDropped, store.MaxVMEvents, total+1-store.MaxVMEvents)
	}
	for i, ev := range resp.Events {
		if want := fmt.Sprint(total - store.MaxVMEvents + i); ev.Message != want || ev.Source != "agent/h1" {
			t.Fatalf("event %d: %q from %s, want %q from agent/h1 (the newest, in order)", i, ev.Message, ev.Source, want)
		}
	}
	// Removal takes the log and its counter with it.
	if _, err := e.vms.DeleteVM(c, &minicloudv1.DeleteVMRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hosts.ReportVMStatus(c, &minicloudv1.ReportVMStatusRequest{Host: "h1", VmId: vm.Meta.Id, Deleted: true}); err != nil {
		t.Fatal(err)
	}
	for k := range e.dump(t) {
		if k == store.VMEventSeqKey(vm.Meta.Id) || strings.HasPrefix(k, store.VMEventsPrefix(vm.Meta.Id)) {
			t.Fatalf("%s left after removal", k)
		}
	}
}

// A create's first event names what the VM was made of (the message is
// built without fmt on the create path).
func TestVMCreatedEventMessage(t *testing.T) {
	e := newEnv(t)
	e.seed()
	vm := e.createVM("web1")
	resp, err := e.vms.ListVMEvents(ctx(t), &minicloudv1.ListVMEventsRequest{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("vm web1 created with image debian, flavor small, addresses %s on default", vm.Status.Addresses[0].Ip)
	if len(resp.Events) != 1 || resp.Events[0].Message != want || resp.Events[0].Source != "api" {
		t.Fatalf("events %v, want one from api: %q", resp.Events, want)
	}
}
