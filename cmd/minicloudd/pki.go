package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"

	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/pkg/pki"
)

// caFileName is where the API writes the cluster CA certificate (public)
// in its data directory, for operators to hand to the CLI.
const caFileName = "ca.crt"

// setupAPIPKI loads (or, on the cluster's first start, creates) the
// cluster CA, writes its certificate to DATA_DIR/ca.crt, issues this
// replica's control-plane client certificate for calling agents and its
// TLS serving certificate. The API serves TLS only, on loopback too: hosts
// prove who they are with client certificates, which need TLS, and the
// same rule everywhere leaves no plaintext mode to misconfigure. Both
// certificates live in memory only and are issued again at every start.
func setupAPIPKI(ctx context.Context, f apiFlags, cli *clientv3.Client, cfg *apiserver.Config) error {
	ca, err := apiserver.EnsureCA(ctx, cli)
	if err != nil {
		return err
	}
	cfg.CA = ca
	if err := privateDataDir(f.dataDir); err != nil {
		return err
	}
	caPath := filepath.Join(f.dataDir, caFileName)
	if err := os.WriteFile(caPath, ca.CertPEM, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", caPath, err)
	}
	name, _ := os.Hostname()
	certPEM, keyPEM, err := ca.Issue(pki.Template{CommonName: "api " + name, Organization: pki.OrgControlPlane, Client: true, Lifetime: pki.ControlPlaneCertLifetime})
	if err != nil {
		return err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("control-plane certificate: %w", err)
	}
	cfg.AgentTLS = pki.ClientTLS(ca.Pool(), &pair, pki.OrgHosts)
	listens := []string{f.listen}
	if f.webListen != "" {
		listens = append(listens, f.webListen)
	}
	dns, ips, err := servingNames(listens, f.tlsSANs)
	if err != nil {
		return err
	}
	certPEM, keyPEM, err = ca.Issue(pki.Template{CommonName: "api " + name, Organization: pki.OrgControlPlane,
		DNSNames: dns, IPs: ips, Server: true, Lifetime: pki.ControlPlaneCertLifetime})
	if err != nil {
		return err
	}
	if cfg.TLS, err = pki.ServerTLS(certPEM, keyPEM, ca.Pool(), ""); err != nil {
		return err
	}
	slog.Info("API serves TLS", "listen", f.listen, "dns", dns, "ips", ips, "ca", caPath, "ca_hash", ca.Hash())
	return nil
}

// servingNames are the subject alternative names of the API's serving
// certificate, which the gRPC and the web listener (--web-listen) share:
// the listen addresses (every address of the machine when one listens on
// all of them), the machine's host name, localhost, and the --tls-san
// extras.
func servingNames(listens []string, extra []string) (dns []string, ips []net.IP, err error) {
	add := func(s string) {
		if ip := net.ParseIP(s); ip != nil {
			if !slices.ContainsFunc(ips, ip.Equal) {
				ips = append(ips, ip)
			}
		} else if s != "" && !slices.Contains(dns, s) {
			dns = append(dns, s)
		}
	}
	for _, listen := range listens {
		host, _, err := net.SplitHostPort(listen)
		if err != nil {
			return nil, nil, fmt.Errorf("listen address %q: %w", listen, err)
		}
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			addrs, err := net.InterfaceAddrs()
			if err != nil {
				return nil, nil, fmt.Errorf("list this machine's addresses: %w", err)
			}
			for _, a := range addrs {
				if n, ok := a.(*net.IPNet); ok {
					add(n.IP.String())
				}
			}
		} else {
			add(host)
		}
	}
	if name, err := os.Hostname(); err == nil {
		add(name)
	}
	add("localhost")
	add("127.0.0.1")
	for _, s := range extra {
		add(s)
	}
	return dns, ips, nil
}

// privateDataDir creates the data directory 0700, and takes read and write
// from group and others where an older version or an operator left them:
// it holds the embedded etcd, image blobs and VM disks. Traversal is left
// as found: an agent on this data directory grants it to QEMU's group only
// (agent/qemuaccess).
func privateDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if m := fi.Mode().Perm(); m&0o066 != 0 {
		if err := os.Chmod(dir, m&^0o066); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	return nil
}
