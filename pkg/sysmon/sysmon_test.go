package sysmon

import (
	"slices"
	"testing"
)

func TestEnv(t *testing.T) {
	for _, c := range []struct {
		in, want []string
		changed  bool
	}{
		{[]string{"PATH=/bin"}, []string{"PATH=/bin", "GODEBUG=" + Setting}, true},
		{[]string{"GODEBUG="}, []string{"GODEBUG=" + Setting}, true},
		{[]string{"GODEBUG=http2client=0", "A=b"}, []string{"GODEBUG=http2client=0," + Setting, "A=b"}, true},
		// An operator's own schedtrace, 0 included (the opt-out), stays.
		{[]string{"GODEBUG=schedtrace=0"}, []string{"GODEBUG=schedtrace=0"}, false},
		{[]string{"GODEBUG=madvdontneed=1,schedtrace=1000"}, []string{"GODEBUG=madvdontneed=1,schedtrace=1000"}, false},
	} {
		got, changed := Env(c.in)
		if !slices.Equal(got, c.want) || changed != c.changed {
			t.Errorf("Env(%q) = %q, %v; want %q, %v", c.in, got, changed, c.want, c.changed)
		}
	}
}
