// Package identity is workload identity for guests: the JWT a guest gets
// from the metadata service to prove to a third party which instance it
// is, the keys that sign it and the rotation of those keys, and the
// published verification keys (JWKS, OpenID discovery). The API signs; the
// hosts never hold a key (docs/security.md).
package identity

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
)

const (
	// TokenLifetime is how long a token is valid: GCE's identity tokens
	// also live one hour. It is the upper bound the key rotation counts
	// with, so it is not configurable upwards.
	TokenLifetime = time.Hour
	// DefaultRotation is how long one key signs. A week keeps the JWKS at
	// two or three keys (the signing one, the next one, and the previous
	// one for an hour after the switch) and limits what one leaked key
	// buys; verifiers refetch the JWKS when they meet an unknown kid, so a
	// shorter period would only cost fetches.
	DefaultRotation = 7 * 24 * time.Hour
	// MinRotation keeps a key signing longer than it is published ahead
	// and after.
	MinRotation = 3 * time.Hour
	// Prepublish is how long the next key is in the JWKS before it signs,
	// so verifiers that cache the set (for up to CacheMaxAge) know it when
	// its first token arrives.
	Prepublish = time.Hour
	// ClockSkew is what verifiers are allowed to be off by: keys stay
	// published that much after their last token expired.
	ClockSkew = 5 * time.Minute
	// CacheMaxAge is the Cache-Control max-age of the published documents.
	CacheMaxAge = 5 * time.Minute
	// Algorithm: RS256, as GCE signs its identity tokens. Every JOSE
	// library and every cloud's OIDC federation verifies RS256, while
	// ES256 support is still patchy among verifiers; the cost (larger
	// signatures, slower signing) does not matter at one token per
	// (VM, audience) per hour.
	Algorithm = "RS256"
	rsaBits   = 2048
	// MaxAudienceLength bounds the aud claim.
	MaxAudienceLength = 256
)

// Formats of a token, as GCE names them (format=standard|full).
const (
	FormatStandard = "standard"
	FormatFull     = "full"
)

// ValidateAudience checks an audience: 1 to MaxAudienceLength printable
// ASCII characters without spaces (a URL or a plain name).
func ValidateAudience(aud string) error {
	if aud == "" {
		return fmt.Errorf("audience is empty: give the party the token is for, e.g. a URL")
	}
	if len(aud) > MaxAudienceLength {
		return fmt.Errorf("audience is %d characters: at most %d", len(aud), MaxAudienceLength)
	}
	for i := 0; i < len(aud); i++ {
		if c := aud[i]; c < 0x21 || c > 0x7e {
			return fmt.Errorf("audience has byte 0x%02x at %d: use printable ASCII without spaces", c, i)
		}
	}
	return nil
}

// Claims are the claims of an identity token. Standard tokens carry only
// the registered claims (sub is the instance id); full ones add Minicloud,
// shaped as GCE's "google" claim so verifiers written for GCE need only
// read another key. aud is a single string, as GCE writes it.
type Claims struct {
	Issuer    string          `json:"iss"`
	Subject   string          `json:"sub"`
	Audience  string          `json:"aud"`
	IssuedAt  int64           `json:"iat"`
	ExpiresAt int64           `json:"exp"`
	Minicloud *MinicloudClaim `json:"minicloud,omitempty"`
}

// The jwt.Claims methods (golang-jwt signs any type that has them).

func (c Claims) GetExpirationTime() (*jwt.NumericDate, error) {
	return jwt.NewNumericDate(time.Unix(c.ExpiresAt, 0)), nil
}
func (c Claims) GetIssuedAt() (*jwt.NumericDate, error) {
	return jwt.NewNumericDate(time.Unix(c.IssuedAt, 0)), nil
}
func (c Claims) GetNotBefore() (*jwt.NumericDate, error) { return nil, nil }
func (c Claims) GetIssuer() (string, error)              { return c.Issuer, nil }
func (c Claims) GetSubject() (string, error)             { return c.Subject, nil }
func (c Claims) GetAudience() (jwt.ClaimStrings, error)  { return jwt.ClaimStrings{c.Audience}, nil }

// MinicloudClaim is the "minicloud" claim of a full token.
type MinicloudClaim struct {
	ComputeEngine ComputeEngine `json:"compute_engine"`
}

// ComputeEngine is the instance's description, with GCE's field names
// plus the host that runs it.
type ComputeEngine struct {
	InstanceID   string `json:"instance_id"`
	InstanceName string `json:"instance_name"`
	ProjectID    string `json:"project_id"`
	Zone         string `json:"zone"`
	Host         string `json:"host"`
	// InstanceCreationTimestamp is in Unix seconds, as GCE gives it.
	InstanceCreationTimestamp int64 `json:"instance_creation_timestamp,omitempty"`
}

// Key is one signing key with its schedule.
type Key struct {
	ID     string
	Signer *rsa.PrivateKey
	// NotBefore and SignUntil bound when the key signs.
	NotBefore, SignUntil time.Time
}

// PublishUntil is when no token the key signed can still be valid.
func (k Key) PublishUntil() time.Time { return k.SignUntil.Add(TokenLifetime + ClockSkew) }

// NewKey makes a key that signs from notBefore for rotation. Its id is
// the RFC 7638 thumbprint of its public key.
func NewKey(notBefore time.Time, rotation time.Duration) (Key, error) {
	priv, err := rsa.GenerateKey(rand.Reader, rsaBits)
	if err != nil {
		return Key{}, fmt.Errorf("generate identity key: %w", err)
	}
	tp, err := (&jose.JSONWebKey{Key: &priv.PublicKey}).Thumbprint(crypto.SHA256)
	if err != nil {
		return Key{}, fmt.Errorf("identity key thumbprint: %w", err)
	}
	return Key{ID: base64.RawURLEncoding.EncodeToString(tp), Signer: priv, NotBefore: notBefore, SignUntil: notBefore.Add(rotation)}, nil
}

// EncodePrivate returns the PKCS#8 PEM of the key's private half.
func (k Key) EncodePrivate() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k.Signer)
	if err != nil {
		return nil, fmt.Errorf("encode identity key %s: %w", k.ID, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParsePrivate reads a key written by EncodePrivate.
func ParsePrivate(id string, pemBytes []byte, notBefore, signUntil time.Time) (Key, error) {
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return Key{}, fmt.Errorf("identity key %s: no PEM block", id)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return Key{}, fmt.Errorf("identity key %s: %w", id, err)
	}
	priv, ok := k.(*rsa.PrivateKey)
	if !ok {
		return Key{}, fmt.Errorf("identity key %s: want an RSA key, got %T", id, k)
	}
	return Key{ID: id, Signer: priv, NotBefore: notBefore, SignUntil: signUntil}, nil
}

// Plan is what the key schedule says at one moment.
type Plan struct {
	// Signing is the key that signs now; nil when none does (NewKeyAt
	// is then set to now).
	Signing *Key
	// NewKeyAt, when not zero, asks for a key that signs from then: none
	// is due to sign within Prepublish, so the next one is made and
	// published now, Prepublish before it signs.
	NewKeyAt time.Time
}

// Schedule decides, from the stored keys, which key signs at now (the
// newest whose time has come, give or take ClockSkew) and whether the next
// must be made. It is a pure function so every replica
// decides alike; the store's compare-and-create makes one key of two
// replicas' simultaneous decisions.
func Schedule(keys []Key, now time.Time) Plan {
	var p Plan
	var last time.Time
	for i := range keys {
		k := &keys[i]
		// A key made by a replica whose clock is ahead (or read with a
		// "now" taken before it was made) counts as signing already:
		// otherwise a replica that lost the race to create the first key
		// would see none signing and make another.
		if !k.NotBefore.After(now.Add(ClockSkew)) && now.Before(k.SignUntil) {
			if p.Signing == nil || k.NotBefore.After(p.Signing.NotBefore) || (k.NotBefore.Equal(p.Signing.NotBefore) && k.ID > p.Signing.ID) {
				p.Signing = k
			}
		}
		if k.SignUntil.After(last) {
			last = k.SignUntil
		}
	}
	switch {
	case p.Signing == nil:
		p.NewKeyAt = now
	case !last.After(now.Add(Prepublish)):
		p.NewKeyAt = last
	}
	return p
}

// Published returns the keys a verifier needs at now: every key not yet
// past PublishUntil, oldest first.
func Published(keys []Key, now time.Time) []Key {
	var out []Key
	for _, k := range keys {
		if now.Before(k.PublishUntil()) {
			out = append(out, k)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].NotBefore.Equal(out[j].NotBefore) {
			return out[i].NotBefore.Before(out[j].NotBefore)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Sign makes a token of claims with k, naming k in the kid header.
func Sign(k Key, claims Claims) (string, error) {
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims)
	tok.Header["kid"] = k.ID
	s, err := tok.SignedString(k.Signer)
	if err != nil {
		return "", fmt.Errorf("sign identity token: %w", err)
	}
	return s, nil
}

// JWKS renders the public halves of keys as a JSON Web Key Set.
func JWKS(keys []Key) ([]byte, error) {
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{}}
	for _, k := range keys {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: &k.Signer.PublicKey, KeyID: k.ID, Algorithm: Algorithm, Use: "sig"})
	}
	b, err := json.Marshal(set)
	if err != nil {
		return nil, fmt.Errorf("encode JWKS: %w", err)
	}
	return b, nil
}

// Well-known paths below the issuer URL.
const (
	JWKSPath      = "/.well-known/jwks.json"
	DiscoveryPath = "/.well-known/openid-configuration"
)

// Discovery renders the OpenID Provider metadata for issuer: enough for
// OIDC federation (cloud IAMs, Vault, Kubernetes) to find the keys.
func Discovery(issuer string) ([]byte, error) {
	issuer = strings.TrimSuffix(issuer, "/")
	doc := map[string]any{
		"issuer":                                issuer,
		"jwks_uri":                              issuer + JWKSPath,
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": []string{Algorithm},
		"claims_supported":                      []string{"iss", "sub", "aud", "iat", "exp", "minicloud"},
	}
	b, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("encode discovery document: %w", err)
	}
	return b, nil
}
