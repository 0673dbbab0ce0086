package errdefs

import (
	"fmt"
	"testing"
)

func TestRoundTripThroughGRPC(t *testing.T) {
	for k := range kindToCode {
		if k == KindUnknown {
			continue
		}
		err := fmt.Errorf("create vm web1: %w", &Error{Kind: k, Msg: "boom"})
		back := FromGRPC(ToGRPC(err))
		if got := KindOf(back); got != k {
			t.Errorf("kind %v came back as %v", k, got)
		}
		if back.Error() != err.Error() {
			t.Errorf("message %q came back as %q", err.Error(), back.Error())
		}
	}
}

func TestUnknownErrorsBecomeInternal(t *testing.T) {
	if got := KindOf(FromGRPC(ToGRPC(fmt.Errorf("plain")))); got != KindInternal {
		t.Fatalf("plain error came back as %v, want internal", got)
	}
}
