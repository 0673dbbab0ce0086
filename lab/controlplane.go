package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/minicloud/minicloud/pkg/client"
)

// The control plane runs in the machine's own network namespace, on the
// control nodes' underlay addresses (.2, .3, .4): etcd member i, API
// replica i and scheduler i on control node i. On real machines these are
// three servers; here they share a kernel but no address, port or
// directory with each other or with `make up`'s all-in-one.

// EtcdEndpoints are the etcd members' client URLs.
func (l *Lab) EtcdEndpoints() []string {
	var out []string
	for i := 1; i <= etcdMembers; i++ {
		out = append(out, "https://"+netip.AddrPortFrom(l.ControlAddr(i), etcdClientPort).String())
	}
	return out
}

func (l *Lab) etcdProc(i int) proc {
	name := fmt.Sprintf("etcd%d", i)
	var cluster []string
	for j := 1; j <= etcdMembers; j++ {
		cluster = append(cluster, fmt.Sprintf("etcd%d=https://%s", j, netip.AddrPortFrom(l.ControlAddr(j), etcdPeerPort)))
	}
	client := "https://" + netip.AddrPortFrom(l.ControlAddr(i), etcdClientPort).String()
	peer := "https://" + netip.AddrPortFrom(l.ControlAddr(i), etcdPeerPort).String()
	return proc{Name: name, Argv: []string{"/usr/bin/etcd",
		"--name", name,
		"--data-dir", filepath.Join(l.Dir, name),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", strings.Join(cluster, ","),
		"--initial-cluster-state", "new", "--initial-cluster-token", "minicloud-lab-" + l.Name,
		"--cert-file", l.etcdCert(i), "--key-file", l.etcdKey(i),
		"--trusted-ca-file", l.etcdCA(), "--client-cert-auth",
		"--peer-cert-file", l.etcdCert(i), "--peer-key-file", l.etcdKey(i),
		"--peer-trusted-ca-file", l.etcdCA(), "--peer-client-cert-auth",
		// Three members, three APIs and schedulers, N libvirtds and
		// their TCG guests share two cores: etcd's default 100 ms
		// heartbeat and 1 s election timeout make leaders flap.
		"--heartbeat-interval", "250", "--election-timeout", "2500",
		"--logger", "zap", "--log-level", "warn",
	}}
}

// etcdArgs are the flags that give a minicloudd role the etcd cluster.
func (l *Lab) etcdArgs() []string {
	return []string{"--etcd-endpoints", strings.Join(l.EtcdEndpoints(), ","),
		"--etcd-cacert", l.etcdCA(), "--etcd-cert", l.etcdClientCert(), "--etcd-key", l.etcdClientKey()}
}

func (l *Lab) apiProc(i int) proc {
	a := l.ControlAddr(i)
	return proc{Name: fmt.Sprintf("api%d", i), Argv: append([]string{l.bin("minicloudd"), "api",
		"--listen", netip.AddrPortFrom(a, apiPort).String(),
		"--metrics-listen", netip.AddrPortFrom(a, apiMetricsPort).String(),
		"--web-listen", netip.AddrPortFrom(a, apiWebPort).String(),
		"--data-dir", filepath.Join(l.Dir, fmt.Sprintf("api%d", i)),
		// One blob store for every replica, as a shared file system is on
		// real machines (docs/architecture.md, "Several API replicas").
		"--image-dir", l.ImageDir(),
		// No guest network may take the underlay's range.
		"--reserved-cidr", l.Subnet.String(),
	}, l.etcdArgs()...)}
}

func (l *Lab) schedulerProc(i int) proc {
	return proc{Name: fmt.Sprintf("scheduler%d", i), Argv: append([]string{l.bin("minicloudd"), "scheduler",
		"--metrics-listen", netip.AddrPortFrom(l.ControlAddr(i), schedMetricsPort).String(),
	}, l.etcdArgs()...)}
}

// controlProcs are the control plane's processes in start order.
func (l *Lab) controlProcs() []proc {
	var out []proc
	for i := 1; i <= etcdMembers; i++ {
		out = append(out, l.etcdProc(i))
	}
	for i := 1; i <= apiReplicas; i++ {
		out = append(out, l.apiProc(i))
	}
	for i := 1; i <= schedReplicas; i++ {
		out = append(out, l.schedulerProc(i))
	}
	return out
}

// Restart starts a control-plane process again (after Kill), with the same
// flags and data, and waits until it serves.
func (l *Lab) Restart(ctx context.Context, name string) error {
	for _, p := range l.controlProcs() {
		if p.Name == name {
			if err := l.start(p); err != nil {
				return err
			}
			if err := l.waitEtcd(ctx); err != nil {
				return err
			}
			return l.waitControl(ctx)
		}
	}
	for _, h := range l.HostNames() {
		if strings.HasPrefix(name, h+"-") {
			return l.StartHost(ctx, h)
		}
	}
	return fmt.Errorf("no lab process %q", name)
}

func (l *Lab) startControlPlane(ctx context.Context) error {
	// All members at once: a member waits for its peers to form the
	// cluster, so starting them one by one and waiting would deadlock.
	for _, p := range l.controlProcs()[:etcdMembers] {
		if err := os.MkdirAll(filepath.Join(l.Dir, p.Name), 0o700); err != nil {
			return err
		}
		if err := l.start(p); err != nil {
			return err
		}
	}
	if err := l.waitEtcd(ctx); err != nil {
		return err
	}
	for _, p := range l.controlProcs()[etcdMembers:] {
		if err := l.start(p); err != nil {
			return err
		}
	}
	return l.waitControl(ctx)
}

// EtcdClient returns a client of the lab's etcd cluster (TLS, the lab's
// client certificate). The caller closes it.
func (l *Lab) EtcdClient() (*clientv3.Client, error) {
	tlsCfg, err := transport.TLSInfo{TrustedCAFile: l.etcdCA(), CertFile: l.etcdClientCert(), KeyFile: l.etcdClientKey()}.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("lab etcd TLS: %w", err)
	}
	return clientv3.New(clientv3.Config{Endpoints: l.EtcdEndpoints(), DialTimeout: 5 * time.Second, TLS: tlsCfg, Logger: zap.NewNop()})
}

// waitEtcd waits until every running member answers with a leader.
func (l *Lab) waitEtcd(ctx context.Context) error {
	cli, err := l.EtcdClient()
	if err != nil {
		return err
	}
	defer cli.Close()
	return poll(ctx, 2*time.Minute, "etcd cluster", func() error {
		for i, ep := range l.EtcdEndpoints() {
			if _, ok := l.running(fmt.Sprintf("etcd%d", i+1)); !ok {
				continue
			}
			sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			st, err := cli.Status(sctx, ep)
			cancel()
			if err != nil {
				return fmt.Errorf("%s: %w", ep, err)
			}
			if st.Leader == 0 {
				return fmt.Errorf("%s has no leader", ep)
			}
		}
		return nil
	})
}

// ClusterCA is the cluster CA certificate (the API replicas keep the CA in
// etcd and write its certificate to DATA_DIR/ca.crt), copied here for the
// CLI and the lab's own client: beyond loopback the API speaks TLS only.
func (l *Lab) ClusterCA() string { return filepath.Join(l.pkiDir(), "cluster-ca.pem") }

// apiDialOptions are how the lab's clients dial an API replica: TLS,
// trusting only the cluster CA, with the admin's token. The one place to
// change how clients authenticate.
func (l *Lab) apiDialOptions() ([]grpc.DialOption, error) {
	token, err := l.AdminToken()
	if err != nil {
		return nil, err
	}
	opts, err := client.UserDialOptions(l.ClusterCA(), token)
	if err != nil {
		return nil, fmt.Errorf("lab API client: %w", err)
	}
	return opts, nil
}

// AdminToken is the bootstrap admin's token, from the admin config the
// first API replica keeps in its data directory (as kubeadm's admin.conf).
func (l *Lab) AdminToken() (string, error) {
	cfg, err := client.LoadConfig(filepath.Join(l.Dir, "api1", "admin.yaml"))
	if err != nil {
		return "", fmt.Errorf("lab admin token: %w", err)
	}
	return cfg.Token, nil
}

// waitControl waits until every running API replica has written the
// cluster CA and serves TLS health checks.
func (l *Lab) waitControl(ctx context.Context) error {
	for i, ep := range l.APIEndpoints() {
		name := fmt.Sprintf("api%d", i+1)
		if _, ok := l.running(name); !ok {
			continue
		}
		err := poll(ctx, 2*time.Minute, "API "+ep, func() error {
			if _, ok := l.running(name); !ok {
				return permanentError{fmt.Errorf("%s exited:\n%s", name, l.tail(name))}
			}
			ca, err := os.ReadFile(filepath.Join(l.Dir, name, "ca.crt"))
			if err != nil {
				return fmt.Errorf("no cluster CA yet: %w", err)
			}
			if err := writeIfChanged(l.ClusterCA(), ca); err != nil {
				return permanentError{err}
			}
			opts, err := client.UserDialOptions(l.ClusterCA(), "")
			if err != nil {
				return err
			}
			conn, err := grpc.NewClient(ep, opts...)
			if err != nil {
				return err
			}
			defer conn.Close()
			hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			r, err := healthpb.NewHealthClient(conn).Check(hctx, &healthpb.HealthCheckRequest{})
			if err != nil {
				return err
			}
			if r.Status != healthpb.HealthCheckResponse_SERVING {
				return fmt.Errorf("status %s", r.Status)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("%w; see %s", err, l.LogFile(name))
		}
	}
	return nil
}

// writeIfChanged writes data to path unless it already holds exactly that.
func writeIfChanged(path string, data []byte) error {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return nil
	}
	return os.WriteFile(path, data, 0o644)
}

func (l *Lab) stopControlPlane() error {
	var errs []error
	procs := l.controlProcs()
	for i := len(procs) - 1; i >= 0; i-- {
		errs = append(errs, l.stop(procs[i].Name, syscall.SIGTERM, 15*time.Second))
	}
	return errors.Join(errs...)
}

// permanentError ends a poll at once.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

// poll calls f until it succeeds, returns a permanentError, or timeout
// passes, and returns f's last error with what.
func poll(ctx context.Context, timeout time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		var perm permanentError
		if errors.As(err, &perm) {
			return fmt.Errorf("%s: %w", what, perm.error)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %w", what, timeout, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %v)", what, ctx.Err(), err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
