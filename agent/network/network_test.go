package network

import "testing"

func TestTapName(t *testing.T) {
	for _, tc := range []struct {
		id   string
		nic  int
		want string
	}{
		{"1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809", 0, "mct1a2b3c4d0"},
		{"1A2B3C4D5E6F", 3, "mct1a2b3c4d3"},
		{"ab-cd", 1, "mctabcd1"},
	} {
		got := TapName(tc.id, tc.nic)
		if got != tc.want {
			t.Errorf("TapName(%q, %d) = %q, want %q", tc.id, tc.nic, got, tc.want)
		}
		p := PortSpec{TapName: got}
		if err := ValidateIfName("port", p.TapName); err != nil {
			t.Errorf("%q: %v", got, err)
		}
	}
}
