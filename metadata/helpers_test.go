package metadata

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/minicloud/minicloud/pkg/nic"
)

const (
	idA = "0a1b2c3d-0000-4000-8000-00000000000a"
	idB = "0b1b2c3d-0000-4000-8000-00000000000b"
)

func testInstance(id, name, ip, mac string) *Instance {
	return &Instance{
		ID: id, Name: name, Hostname: name, Domain: DefaultDomain, Project: "proj1",
		AvailabilityZone: "zone-a", Region: "zone", InstanceType: "small", Image: "debian-12",
		LaunchTime: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		Interfaces: []Interface{{
			Bridge: "mc-test", Network: "default", MAC: mustMAC(mac),
			Address: netip.MustParsePrefix(ip + "/24"), Gateway: netip.MustParseAddr("10.0.0.1"), MTU: 1450,
			TapName: nic.TapName(id, 0),
		}},
		SSHKeys:    []SSHKey{{Name: "alice", Key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl5Y2hEY9+0XnH8cS4Pn1Mo9h3KxG8nKJ9YVtq9GkR2 alice"}},
		Labels:     map[string]string{"role": "web"},
		Tags:       []string{"http-server"},
		Attributes: map[string]string{"role": "web"},
	}
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// loopbackGuests maps loopback source addresses to guest identities: the
// explicit resolver the server accepts for listeners that are not bridges.
// Test clients dial from 127.0.0.<n> and are seen as the mapped peer.
type loopbackGuests map[netip.Addr]Peer

func (g loopbackGuests) ResolvePeer(c net.Conn) (Peer, error) {
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return Peer{}, err
	}
	p, ok := g[ap.Addr()]
	if !ok {
		return Peer{Interface: "lo", Addr: ap.Addr()}, nil
	}
	return p, nil
}

type testEnv struct {
	t    *testing.T
	srv  *Server
	dir  *Directory
	base string
	key  ed25519.PrivateKey
}

// newTestEnv serves instances A (10.0.0.5, client 127.0.0.2) and B
// (10.0.0.6, client 127.0.0.3) on a real loopback TCP listener. 127.0.0.4
// maps to A's address with a foreign MAC; 127.0.0.9 maps to nobody.
func newTestEnv(t *testing.T, mutate func(*Options)) *testEnv {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	a := testInstance(idA, "web1", "10.0.0.5", "52:54:00:00:00:0a")
	a.UserData = []byte("#cloud-config\nhostname: web1\n")
	b := testInstance(idB, "web2", "10.0.0.6", "52:54:00:00:00:0b")
	b.SSHKeys = nil
	dir := NewDirectory()
	if err := dir.Set([]*Instance{a, b}); err != nil {
		t.Fatal(err)
	}
	opts := Options{IdentityKey: key}
	if mutate != nil {
		mutate(&opts)
	}
	srv, err := NewServer(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	guests := loopbackGuests{
		netip.MustParseAddr("127.0.0.2"): {Interface: "mc-test", Addr: netip.MustParseAddr("10.0.0.5"), MAC: mustMAC("52:54:00:00:00:0a")},
		netip.MustParseAddr("127.0.0.3"): {Interface: "mc-test", Addr: netip.MustParseAddr("10.0.0.6"), MAC: mustMAC("52:54:00:00:00:0b")},
		netip.MustParseAddr("127.0.0.4"): {Interface: "mc-test", Addr: netip.MustParseAddr("10.0.0.5"), MAC: mustMAC("52:54:00:00:00:99")},
		netip.MustParseAddr("127.0.0.5"): {Interface: "mc-other", Addr: netip.MustParseAddr("10.0.0.5"), MAC: mustMAC("52:54:00:00:00:0a")},
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeListener(l, guests) }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return &testEnv{t: t, srv: srv, dir: dir, base: "http://" + l.Addr().String(), key: key}
}

// client returns an HTTP client whose connections come from 127.0.0.<n>.
func client(n int) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(n))}, Timeout: 5 * time.Second}
	return &http.Client{
		Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true},
		Timeout:   30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

type result struct {
	code   int
	body   string
	header http.Header
}

func (e *testEnv) do(from int, method, path string, hdr map[string]string) result {
	e.t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), method, e.base+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := client(from).Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return result{code: resp.StatusCode, body: string(b), header: resp.Header}
}

func (e *testEnv) get(from int, path string) result { return e.do(from, "GET", path, nil) }

func (e *testEnv) expect(from int, path string, code int, body string) {
	e.t.Helper()
	got := e.get(from, path)
	if got.code != code || (body != "" && got.body != body) {
		e.t.Errorf("GET %s from 127.0.0.%d = %d %q, want %d %q", path, from, got.code, got.body, code, body)
	}
}

func lines(xs ...string) string { return strings.Join(xs, "\n") }

func ioCopy(w io.Writer, resp *http.Response) (int64, error) { return io.Copy(w, resp.Body) }

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return 0
	}
	return m.GetCounter().GetValue()
}

func histogramCount(o prometheus.Observer) uint64 {
	var m dto.Metric
	if err := o.(prometheus.Metric).Write(&m); err != nil {
		return 0
	}
	return m.GetHistogram().GetSampleCount()
}

func gaugeValue(g prometheus.Gauge) float64 {
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		return 0
	}
	return m.GetGauge().GetValue()
}

func newKeyPair(t *testing.T) (ed25519.PublicKey, ed25519.PrivateKey, error) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv, nil
}
