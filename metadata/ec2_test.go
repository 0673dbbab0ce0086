package metadata

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestEC2Tree walks every path cloud-init 22.4's Ec2 and OpenStack
// datasources request (version probe, meta-data crawl, user-data, identity)
// plus EC2's listing format.
func TestEC2Tree(t *testing.T) {
	e := newTestEnv(t, nil)
	mdListing := lines("ami-id", "ami-launch-index", "ami-manifest-path", "block-device-mapping/",
		"hostname", "instance-action", "instance-id", "instance-life-cycle", "instance-type",
		"local-hostname", "local-ipv4", "mac", "network/", "placement/", "public-keys/",
		"security-groups", "services/", "tags/")
	tests := []struct {
		from int
		path string
		code int
		body string
	}{
		{2, "/", 200, strings.Join(EC2Versions, "\n") + "\nlatest"},
		{2, "/2021-03-23/meta-data/instance-id", 200, idA},
		{2, "/2018-09-24/meta-data/instance-id", 200, idA},
		{2, "/2016-09-02/meta-data/instance-id", 200, idA},
		{2, "/2009-04-04/meta-data/instance-id", 200, idA},
		{3, "/latest/meta-data/instance-id", 200, idB},
		{2, "/latest", 200, lines("dynamic/", "meta-data/", "user-data")},
		{2, "/latest/", 200, lines("dynamic/", "meta-data/", "user-data")},
		{3, "/latest/", 200, lines("dynamic/", "meta-data/")},
		{2, "/2009-04-04/meta-data/", 200, mdListing},
		{2, "/2009-04-04/meta-data", 200, mdListing},
		{2, "/latest/meta-data/hostname", 200, "web1.minicloud.internal"},
		{2, "/latest/meta-data/local-hostname", 200, "web1.minicloud.internal"},
		{2, "/latest/meta-data/local-ipv4", 200, "10.0.0.5"},
		{2, "/latest/meta-data/mac", 200, "52:54:00:00:00:0a"},
		{2, "/latest/meta-data/instance-type", 200, "small"},
		{2, "/latest/meta-data/ami-id", 200, "debian-12"},
		{2, "/latest/meta-data/ami-launch-index", 200, "0"},
		{2, "/latest/meta-data/placement/", 200, lines("availability-zone", "region")},
		{2, "/latest/meta-data/placement/availability-zone", 200, "zone-a"},
		{2, "/latest/meta-data/block-device-mapping/", 200, lines("ami", "root")},
		{2, "/latest/meta-data/public-keys/", 200, "0=alice"},
		{2, "/latest/meta-data/public-keys/0/", 200, "openssh-key"},
		{2, "/latest/meta-data/public-keys/0/openssh-key", 200, testInstance(idA, "", "10.0.0.5", "52:54:00:00:00:0a").SSHKeys[0].Key + "\n"},
		{3, "/latest/meta-data/public-keys/", 404, ""},
		{2, "/latest/meta-data/network/", 200, "interfaces/"},
		{2, "/latest/meta-data/network/interfaces/macs/", 200, "52:54:00:00:00:0a/"},
		{2, "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:0a/", 200, lines("device-number", "interface-id",
			"local-hostname", "local-ipv4s", "mac", "owner-id", "security-group-ids", "subnet-id",
			"subnet-ipv4-cidr-block", "vpc-id", "vpc-ipv4-cidr-block", "vpc-ipv4-cidr-blocks")},
		{2, "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:0a/device-number", 200, "0"},
		{2, "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:0a/local-ipv4s", 200, "10.0.0.5"},
		{2, "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:0a/subnet-ipv4-cidr-block", 200, "10.0.0.0/24"},
		{2, "/latest/meta-data/services/domain", 200, "minicloud.internal"},
		{2, "/latest/meta-data/tags/instance/", 200, "role"},
		{2, "/latest/meta-data/tags/instance/role", 200, "web"},
		{2, "/latest/user-data", 200, "#cloud-config\nhostname: web1\n"},
		{2, "/2009-04-04/user-data", 200, "#cloud-config\nhostname: web1\n"},
		{3, "/latest/user-data", 404, ""},
		{2, "/latest/dynamic/", 200, "instance-identity/"},
		{2, "/latest/dynamic/instance-identity/", 200, lines("document", "signature")},
		// Clean 404s for what does not exist or is malformed.
		{2, "/1999-01-01/meta-data/instance-id", 404, ""},
		{2, "/latest/meta-data/nope", 404, ""},
		{2, "/latest/meta-data/instance-id/", 404, ""},
		{2, "/latest//meta-data/instance-id", 404, ""},
		{2, "/latest/meta-data/../user-data", 404, ""},
		{2, "/latest/meta-data/%2e%2e/user-data", 404, ""},
		{2, "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:0b/", 404, ""},
	}
	for _, tc := range tests {
		e.expect(tc.from, tc.path, tc.code, tc.body)
	}
}

func TestEC2IdentityDocumentSigned(t *testing.T) {
	e := newTestEnv(t, nil)
	doc := e.get(2, "/latest/dynamic/instance-identity/document")
	if doc.code != 200 {
		t.Fatalf("document: %d", doc.code)
	}
	var d map[string]any
	if err := json.Unmarshal([]byte(doc.body), &d); err != nil {
		t.Fatalf("document is not JSON: %v", err)
	}
	for k, want := range map[string]string{
		"instanceId": idA, "privateIp": "10.0.0.5", "availabilityZone": "zone-a",
		"instanceType": "small", "imageId": "debian-12", "accountId": "proj1",
		"pendingTime": "2026-01-02T03:04:05Z", "region": "zone",
	} {
		if d[k] != want {
			t.Errorf("document %s = %v, want %q", k, d[k], want)
		}
	}
	sig := e.get(2, "/latest/dynamic/instance-identity/signature")
	raw, err := base64.StdEncoding.DecodeString(sig.body)
	if err != nil {
		t.Fatalf("signature not base64: %v", err)
	}
	if err := VerifyIdentityDocument(e.key.Public(), []byte(doc.body), raw); err != nil {
		t.Fatalf("signature does not verify: %v", err)
	}
	other := e.get(3, "/latest/dynamic/instance-identity/document")
	if err := VerifyIdentityDocument(e.key.Public(), []byte(other.body), raw); err == nil {
		t.Fatal("A's signature verifies B's document")
	}
}

func TestIMDSv2(t *testing.T) {
	// The clock is read by the server's loop: the event-loop front end
	// writes with raw system calls, which the race detector does not see
	// as ordering the client's read after the handler's.
	var now atomic.Pointer[time.Time]
	start := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	now.Store(&start)
	e := newTestEnv(t, func(o *Options) { o.Now = func() time.Time { return *now.Load() } })
	put := func(from int, hdr map[string]string) result {
		return e.do(from, "PUT", "/latest/api/token", hdr)
	}
	ttl := func(v string) map[string]string { return map[string]string{tokenTTLHeader: v} }

	for _, bad := range []string{"0", "21601", "-1", "abc", "1.5", ""} {
		if got := put(2, ttl(bad)); got.code != 400 {
			t.Errorf("ttl %q: %d, want 400", bad, got.code)
		}
	}
	if got := put(2, map[string]string{tokenTTLHeader: "60", "X-Forwarded-For": "192.0.2.1"}); got.code != 403 {
		t.Errorf("token PUT with X-Forwarded-For: %d, want 403", got.code)
	}
	for _, m := range []string{"GET", "POST", "DELETE"} {
		if got := e.do(2, m, "/latest/api/token", ttl("60")); got.code != 405 {
			t.Errorf("%s token: %d, want 405", m, got.code)
		}
	}
	if got := e.do(2, "PUT", "/latest/meta-data/instance-id", nil); got.code != 405 {
		t.Errorf("PUT meta-data: %d, want 405", got.code)
	}

	tokA := put(2, ttl("21600"))
	if tokA.code != 200 || tokA.header.Get(tokenTTLHeader) != "21600" || tokA.body == "" {
		t.Fatalf("token: %d %q ttl header %q", tokA.code, tokA.body, tokA.header.Get(tokenTTLHeader))
	}
	withTok := func(tok string) map[string]string { return map[string]string{tokenHeader: tok} }
	if got := e.do(2, "GET", "/latest/meta-data/instance-id", withTok(tokA.body)); got.code != 200 || got.body != idA {
		t.Errorf("A with its token: %d %q", got.code, got.body)
	}
	// A token is bound to the VM that asked for it.
	if got := e.do(3, "GET", "/latest/meta-data/instance-id", withTok(tokA.body)); got.code != 401 {
		t.Errorf("B with A's token: %d, want 401", got.code)
	}
	if got := e.do(2, "GET", "/latest/meta-data/instance-id", withTok("garbage")); got.code != 401 {
		t.Errorf("garbage token: %d, want 401", got.code)
	}
	short := put(2, ttl("1"))
	later := start.Add(2 * time.Second)
	now.Store(&later)
	if got := e.do(2, "GET", "/latest/meta-data/instance-id", withTok(short.body)); got.code != 401 {
		t.Errorf("expired token: %d, want 401", got.code)
	}
	// IMDSv1 works while the VM allows it.
	e.expect(2, "/latest/meta-data/instance-id", 200, idA)

	// Require tokens on A: token-less requests now get 401.
	a, _ := e.dir.Get(idA)
	req := *a
	req.TokensRequired = true
	if err := e.dir.Upsert(&req); err != nil {
		t.Fatal(err)
	}
	e.expect(2, "/latest/meta-data/instance-id", 401, "")
	e.expect(2, "/latest/user-data", 401, "")
	if got := e.do(2, "GET", "/latest/meta-data/instance-id", withTok(tokA.body)); got.code != 200 {
		t.Errorf("required, with token: %d", got.code)
	}
	e.expect(3, "/latest/meta-data/instance-id", 200, idB)
}

func TestIdentitySignatureRSA(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	doc := []byte(`{"instanceId":"x"}`)
	sig, err := SignIdentityDocument(key, doc)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyIdentityDocument(&key.PublicKey, doc, sig); err != nil {
		t.Fatal(err)
	}
	if err := VerifyIdentityDocument(&key.PublicKey, []byte(`{"instanceId":"y"}`), sig); err == nil {
		t.Fatal("signature verified another document")
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := SignIdentityDocument(ec, doc); err == nil {
		t.Fatal("ECDSA key accepted: clients expect Ed25519 or RSA")
	}
}
