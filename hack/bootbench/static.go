package main

// The comparison: the same guest on the same minicloud network (same DHCP,
// DNS, anti-spoofing filters), but its connections to 169.254.169.254:80
// are DNATed to a plain static server holding the answers pre-rendered, in
// a network namespace of the harness's own behind a veth. The guest still
// talks to 169.254.169.254:80 (conntrack undoes the DNAT on the replies).
// TPROXY would keep the packet's addresses and serve from the host itself,
// but it does not work with br_netfilter (bridge-nf-call-iptables=1, as on
// this machine): the socket it assigns in the bridge's prerouting pass is
// lost before local delivery.

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/time/rate"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/metadata"
)

// snapshot renders the EC2 and OpenStack trees of vm with the metadata
// package itself (in process, on loopback, identity fixed to the VM) and
// returns every path with its body: what a static server needs to answer
// like minicloud does.
func snapshot(vm *minicloudv1.VM, userData []byte) (map[string][]byte, error) {
	inst, err := metadata.InstanceFromVM(vm, userData)
	if err != nil {
		return nil, err
	}
	dir := metadata.NewDirectory()
	if err := dir.Upsert(inst); err != nil {
		return nil, err
	}
	srv, err := metadata.NewServer(dir, metadata.Options{RateLimit: rate.Inf})
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	nic := inst.Primary()
	peer := metadata.Peer{Interface: nic.Bridge, Addr: nic.Address.Addr()}
	go func() {
		_ = srv.ServeListener(l, metadata.PeerResolverFunc(func(net.Conn) (metadata.Peer, error) { return peer, nil }))
	}()
	base := "http://" + l.Addr().String()

	files := map[string][]byte{}
	get := func(path string) ([]byte, bool, error) {
		resp, err := http.Get(base + path)
		if err != nil {
			return nil, false, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			return nil, false, err
		}
		files[path] = body
		return body, true, nil
	}
	lines := func(b []byte) []string {
		if len(b) == 0 {
			return nil
		}
		return strings.Split(string(b), "\n")
	}
	// EC2: every version, following the listings (a "0=name" entry is the
	// directory "0/").
	var walkEC2 func(dir string) error
	walkEC2 = func(dir string) error {
		body, ok, err := get(dir)
		if err != nil || !ok {
			return err
		}
		files[strings.TrimSuffix(dir, "/")] = body // EC2 serves directories without the slash too
		for _, e := range lines(body) {
			switch {
			case strings.Contains(e, "="):
				err = walkEC2(dir + e[:strings.Index(e, "=")] + "/")
			case strings.HasSuffix(e, "/"):
				err = walkEC2(dir + e)
			default:
				_, _, err = get(dir + e)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	versions, _, err := get("/")
	if err != nil {
		return nil, err
	}
	for _, v := range lines(versions) {
		if err := walkEC2("/" + v + "/"); err != nil {
			return nil, err
		}
	}
	// OpenStack: /openstack lists versions, a version lists its files.
	osVersions, _, err := get("/openstack")
	if err != nil {
		return nil, err
	}
	files["/openstack/"] = osVersions
	for _, v := range lines(osVersions) {
		list, ok, err := get("/openstack/" + v)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		files["/openstack/"+v+"/"] = list
		for _, f := range lines(list) {
			if _, _, err := get("/openstack/" + v + "/" + f); err != nil {
				return nil, err
			}
		}
	}
	return files, nil
}

// staticServer answers GETs from a fixed map: no identity, no rate limit,
// no rendering — the floor any metadata service can be compared to.
type staticServer struct {
	files map[string][]byte
	ns    string // network namespace the server listens in
	veth  string // host side of its link
	addr  netip.AddrPort
	l     net.Listener
	srv   *http.Server

	mu       sync.Mutex
	first    time.Time
	requests int
	missing  []string
}

// startStatic starts the server on port 80 in a new network namespace
// reached from the host over a veth (10.250.<n>.2/30, host side .1).
func startStatic(files map[string][]byte) (*staticServer, error) {
	n := os.Getpid()%200 + 20
	s := &staticServer{files: files, ns: fmt.Sprintf("mcbootbench%d", n), veth: fmt.Sprintf("mcbb%d", n)}
	hostAddr, nsAddr := fmt.Sprintf("10.250.%d.1", n), fmt.Sprintf("10.250.%d.2", n)
	s.addr = netip.MustParseAddrPort(nsAddr + ":80")
	steps := [][]string{
		{"netns", "add", s.ns},
		{"link", "add", s.veth, "type", "veth", "peer", "name", "eth0", "netns", s.ns},
		{"addr", "add", hostAddr + "/30", "dev", s.veth},
		{"link", "set", s.veth, "up"},
		{"-n", s.ns, "link", "set", "lo", "up"},
		{"-n", s.ns, "addr", "add", nsAddr + "/30", "dev", "eth0"},
		{"-n", s.ns, "link", "set", "eth0", "up"},
		{"-n", s.ns, "route", "add", "default", "via", hostAddr},
	}
	for _, args := range steps {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			s.close()
			return nil, fmt.Errorf("ip %s: %w\n%s", strings.Join(args, " "), err, out)
		}
	}
	l, err := listenIn(s.ns, s.addr.String())
	if err != nil {
		s.close()
		return nil, err
	}
	s.l = l
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.srv.Serve(l) }()
	return s, nil
}

// listenIn opens a TCP listener inside the named network namespace (the
// socket stays there after the thread switches back).
func listenIn(name, addr string) (net.Listener, error) {
	target, err := netns.GetFromName(name)
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter netns %s: %w", name, err)
	}
	l, lerr := net.Listen("tcp4", addr)
	if err := netns.Set(orig); err == nil {
		// A thread left in another namespace must die with its goroutine.
		runtime.UnlockOSThread()
	}
	return l, lerr
}

func (s *staticServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if s.requests == 0 {
		s.first = time.Now()
	}
	s.requests++
	body, ok := s.files[r.URL.Path]
	if !ok {
		s.missing = append(s.missing, r.Method+" "+r.URL.Path)
	}
	s.mu.Unlock()
	if !ok || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write(body)
}

func (s *staticServer) stats() (first time.Time, requests int, missing []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.first, s.requests, append([]string(nil), s.missing...)
}

func (s *staticServer) close() {
	if s.srv != nil {
		_ = s.srv.Close()
	}
	_ = exec.Command("ip", "link", "del", s.veth).Run()
	_ = exec.Command("ip", "netns", "del", s.ns).Run()
}

// divert installs, in a nftables table of the harness's own, a DNAT rule
// sending the guest's connections to 169.254.169.254:80 to target. It
// returns the undo.
func divert(guest netip.Addr, target netip.AddrPort) (func(), error) {
	table := fmt.Sprintf("mc_bootbench_%d", os.Getpid())
	rules := fmt.Sprintf(`table ip %s {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip saddr %s ip daddr 169.254.169.254 tcp dport 80 counter dnat to %s
	}
}
`, table, guest, target)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nft dnat rule: %w\n%s", err, out)
	}
	return func() { _ = exec.Command("nft", "delete", "table", "ip", table).Run() }, nil
}
