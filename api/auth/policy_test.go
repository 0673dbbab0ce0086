package auth_test

import (
	"testing"

	"github.com/minicloud/minicloud/api/auth"
	"github.com/minicloud/minicloud/pkg/docsync"
)

// TestPolicyTableInDocs keeps docs/security.md's table equal to Policy.
func TestPolicyTableInDocs(t *testing.T) {
	docsync.Check(t, "../../docs/security.md", "policy table", auth.MarkdownPolicyTable())
}

func TestRoleOrder(t *testing.T) {
	for _, c := range []struct {
		have, need auth.Role
		want       bool
	}{
		{auth.RoleAdmin, auth.RoleReader, true}, {auth.RoleMember, auth.RoleReader, true}, {auth.RoleMember, auth.RoleMember, true},
		{auth.RoleReader, auth.RoleMember, false}, {auth.RoleMember, auth.RoleAdmin, false}, {"bogus", auth.RoleReader, false}, {auth.RoleAdmin, "bogus", false},
	} {
		if got := c.have.Includes(c.need); got != c.want {
			t.Errorf("%s includes %s = %v, want %v", c.have, c.need, got, c.want)
		}
	}
}

func TestParseToken(t *testing.T) {
	tok, err := auth.NewToken("ann-1")
	if err != nil {
		t.Fatal(err)
	}
	got, ok := auth.ParseToken(tok.String())
	if !ok || got != tok || got.PublicID() != "ann-1."+tok.ID {
		t.Fatalf("round trip %q: %+v %v", tok.String(), got, ok)
	}
	for _, bad := range []string{"", "mct_", "mct_ann.abcdefgh.short", "xyz_ann.abcdefgh." + tok.Secret, "mct_Ann.abcdefgh." + tok.Secret, tok.String() + "x"} {
		if _, ok := auth.ParseToken(bad); ok {
			t.Errorf("ParseToken(%q) accepted", bad)
		}
	}
	if !auth.SecretMatches(tok.Secret, auth.HashSecret(tok.Secret)) || auth.SecretMatches(tok.Secret+"x", auth.HashSecret(tok.Secret)) {
		t.Error("SecretMatches")
	}
}
