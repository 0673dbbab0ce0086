package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"regexp"
	"strings"
)

// Bearer tokens look like "mct_<user>.<id>.<secret>": the prefix lets
// secret scanners and people recognise one; "<user>.<id>" is the token's
// public id (safe to log and audit, and the etcd key); the secret (32
// characters of [a-z0-9], about 165 bits) is stored only as its SHA-256 —
// it is random, so a plain hash is enough (no password stretching).
const (
	TokenPrefix    = "mct_"
	tokenAlphabet  = "abcdefghijklmnopqrstuvwxyz0123456789"
	tokenIDLength  = 8
	tokenSecretLen = 32
)

var tokenRE = regexp.MustCompile(`^mct_([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)\.([a-z0-9]{8})\.([a-z0-9]{32})$`)

// TokenParts is a parsed bearer token.
type TokenParts struct {
	User, ID, Secret string
}

// PublicID is "<user>.<id>".
func (t TokenParts) PublicID() string { return t.User + "." + t.ID }

// String is the whole token, secret included: never log it.
func (t TokenParts) String() string { return TokenPrefix + t.User + "." + t.ID + "." + t.Secret }

// ParseToken splits a bearer token; ok is false when s is not one.
func ParseToken(s string) (TokenParts, bool) {
	m := tokenRE.FindStringSubmatch(s)
	if m == nil {
		return TokenParts{}, false
	}
	return TokenParts{User: m[1], ID: m[3], Secret: m[4]}, true
}

// ParsePublicID splits "<user>.<id>" (or a whole token) into user and id.
func ParsePublicID(s string) (user, id string, ok bool) {
	if t, ok := ParseToken(s); ok {
		return t.User, t.ID, true
	}
	user, id, ok = strings.Cut(s, ".")
	if !ok || len(id) != tokenIDLength || strings.Trim(id, tokenAlphabet) != "" || user == "" {
		return "", "", false
	}
	return user, id, true
}

// NewToken draws a fresh token for user.
func NewToken(user string) (TokenParts, error) {
	id, err := randomString(tokenIDLength)
	if err != nil {
		return TokenParts{}, err
	}
	secret, err := randomString(tokenSecretLen)
	if err != nil {
		return TokenParts{}, err
	}
	return TokenParts{User: user, ID: id, Secret: secret}, nil
}

// HashSecret is what is stored of a secret.
func HashSecret(secret string) []byte {
	sum := sha256.Sum256([]byte(secret))
	return sum[:]
}

// SecretMatches compares in constant time.
func SecretMatches(secret string, stored []byte) bool {
	return subtle.ConstantTimeCompare(HashSecret(secret), stored) == 1
}

func randomString(n int) (string, error) {
	// Rejection sampling: every character equally likely.
	out := make([]byte, 0, n)
	buf := make([]byte, 2*n)
	for len(out) < n {
		if _, err := rand.Read(buf); err != nil {
			return "", fmt.Errorf("random token: %w", err)
		}
		for _, b := range buf {
			if int(b) < 252 && len(out) < n { // 252 = 7 × 36
				out = append(out, tokenAlphabet[int(b)%len(tokenAlphabet)])
			}
		}
	}
	return string(out), nil
}
