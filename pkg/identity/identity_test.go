package identity

import (
	"strings"
	"testing"
	"time"
)

func TestScheduleRotatesWithPrepublishedKeys(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rot := 24 * time.Hour
	k := func(id string, nb time.Time) Key { return Key{ID: id, NotBefore: nb, SignUntil: nb.Add(rot)} }

	// No key: one that signs now.
	if p := Schedule(nil, t0); p.Signing != nil || !p.NewKeyAt.Equal(t0) {
		t.Fatalf("empty: %+v", p)
	}
	k1 := k("k1", t0)
	keys := []Key{k1}
	if p := Schedule(keys, t0.Add(time.Hour)); p.Signing == nil || p.Signing.ID != "k1" || !p.NewKeyAt.IsZero() {
		t.Fatalf("mid-life: %+v", p)
	}
	// Within Prepublish of k1's end the next key is asked for, to sign
	// from k1's end.
	at := t0.Add(rot - Prepublish)
	p := Schedule(keys, at)
	if p.Signing == nil || p.Signing.ID != "k1" || !p.NewKeyAt.Equal(k1.SignUntil) {
		t.Fatalf("prepublish: %+v", p)
	}
	k2 := k("k2", k1.SignUntil)
	keys = append(keys, k2)
	if p := Schedule(keys, at); p.Signing.ID != "k1" || !p.NewKeyAt.IsZero() {
		t.Fatalf("next key made: %+v", p)
	}
	if p := Schedule(keys, k2.NotBefore); p.Signing.ID != "k2" {
		t.Fatalf("at the switch: %+v", p)
	}
	// A key made a moment "later" by a replica whose clock is ahead
	// still counts: no second key.
	k3 := k("k3", t0.Add(30*time.Second))
	if p := Schedule([]Key{k3}, t0); p.Signing == nil || p.Signing.ID != "k3" || !p.NewKeyAt.IsZero() {
		t.Fatalf("skewed replica: %+v", p)
	}
	// After a long outage with every key past its end: a new key now.
	late := k2.SignUntil.Add(time.Hour)
	if p := Schedule(keys, late); p.Signing != nil || !p.NewKeyAt.Equal(late) {
		t.Fatalf("after outage: %+v", p)
	}
}

func TestPublishedKeepsKeysUntilTheirTokensExpired(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	old := Key{ID: "old", NotBefore: t0, SignUntil: t0.Add(time.Hour)}
	cur := Key{ID: "cur", NotBefore: old.SignUntil, SignUntil: old.SignUntil.Add(time.Hour)}
	ids := func(ks []Key) string {
		var s []string
		for _, k := range ks {
			s = append(s, k.ID)
		}
		return strings.Join(s, ",")
	}
	if got := ids(Published([]Key{cur, old}, old.SignUntil.Add(TokenLifetime))); got != "old,cur" {
		t.Errorf("while old tokens live: %s", got)
	}
	if got := ids(Published([]Key{cur, old}, old.PublishUntil())); got != "cur" {
		t.Errorf("after: %s", got)
	}
}

func TestValidateAudience(t *testing.T) {
	for _, ok := range []string{"a", "https://vault.example:8200/v1/auth", strings.Repeat("x", MaxAudienceLength), "//iam.googleapis.com/projects/1/x"} {
		if err := ValidateAudience(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", " ", "a b", "a\x00", "caf\u00e9", strings.Repeat("x", MaxAudienceLength+1), "tab\t"} {
		if err := ValidateAudience(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
