package metadata

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// IMDSv2 session tokens. A token is
//
//	base64url(expiry unix seconds (8 bytes) || HMAC-SHA256(secret, vmID || expiry)[:20])
//
// so it needs no server-side state, dies with the process (the secret is
// per process, like AWS tokens that do not survive a host move), and is
// valid only for the VM that asked: the server recomputes the MAC with the
// id of the VM the request comes from.
const (
	tokenHeader    = "X-Aws-Ec2-Metadata-Token"
	tokenTTLHeader = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
	maxTokenTTL    = 21600
	tokenMACLen    = 20
)

type tokenMinter struct {
	secret []byte
}

func newTokenMinter(secret []byte) (*tokenMinter, error) {
	if len(secret) == 0 {
		secret = make([]byte, 32)
		if _, err := rand.Read(secret); err != nil {
			return nil, fmt.Errorf("token secret: %w", err)
		}
	}
	return &tokenMinter{secret: secret}, nil
}

// parseTTL validates the TTL header as AWS does: an integer in 1..21600.
func parseTTL(h string) (time.Duration, error) {
	h = strings.TrimSpace(h)
	if h == "" {
		return 0, errors.New("missing " + tokenTTLHeader)
	}
	n, err := strconv.Atoi(h)
	if err != nil || n < 1 || n > maxTokenTTL {
		return 0, fmt.Errorf("%s must be an integer from 1 to %d", tokenTTLHeader, maxTokenTTL)
	}
	return time.Duration(n) * time.Second, nil
}

func (m *tokenMinter) mac(vmID string, expiry uint64) []byte {
	h := hmac.New(sha256.New, m.secret)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], expiry)
	h.Write([]byte(vmID))
	h.Write([]byte{0})
	h.Write(b[:])
	return h.Sum(nil)[:tokenMACLen]
}

func (m *tokenMinter) mint(vmID string, now time.Time, ttl time.Duration) string {
	expiry := uint64(now.Add(ttl).Unix())
	buf := make([]byte, 8, 8+tokenMACLen)
	binary.BigEndian.PutUint64(buf, expiry)
	buf = append(buf, m.mac(vmID, expiry)...)
	return base64.RawURLEncoding.EncodeToString(buf)
}

// valid says whether token was minted for vmID and has not expired.
func (m *tokenMinter) valid(token, vmID string, now time.Time) bool {
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || len(raw) != 8+tokenMACLen {
		return false
	}
	expiry := binary.BigEndian.Uint64(raw[:8])
	if uint64(now.Unix()) >= expiry {
		return false
	}
	return hmac.Equal(raw[8:], m.mac(vmID, expiry))
}
