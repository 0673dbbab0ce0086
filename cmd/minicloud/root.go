package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"sigs.k8s.io/yaml"

	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/pki"
)

const (
	defaultEndpoint = "127.0.0.1:8640"
	defaultProject  = "default"
)

// streams are the process's standard streams; tests replace them.
type streams struct {
	in          io.Reader
	out, errOut io.Writer
	// errIsTerminal says whether errOut is a terminal (progress bars).
	errIsTerminal bool
}

func newIO(in *os.File, out, errOut *os.File) streams {
	_, err := unix.IoctlGetTermios(int(errOut.Fd()), unix.TCGETS)
	return streams{in: in, out: out, errOut: errOut, errIsTerminal: err == nil}
}

// app is the state shared by all commands of one invocation.
type app struct {
	streams
	getenv func(string) string

	endpointFlag string
	projectFlag  string
	caFlag       string
	root         *cobra.Command

	endpoint string // resolved by connect
	client   *client.Client
}

// run executes one command line and returns the process exit code.
func run(ctx context.Context, args []string, s streams, getenv func(string) string) int {
	a := &app{streams: s, getenv: getenv}
	root := a.newRootCommand()
	root.SetArgs(args)
	root.SetIn(s.in)
	root.SetOut(s.out)
	root.SetErr(s.errOut)
	err := root.ExecuteContext(ctx)
	if a.client != nil {
		a.client.Close()
	}
	if err != nil {
		fmt.Fprintf(s.errOut, "minicloud: %s\n", errorMessage(err, a.endpoint))
	}
	return exitCode(err)
}

func (a *app) newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "minicloud",
		Short: "Manage VMs, images, flavors and networks on a minicloud",
		Long: `minicloud is the command line client of a minicloud API server.

The endpoint is taken from --endpoint, else $MINICLOUD_ENDPOINT, else
"endpoints:" (a list) or "endpoint:" in ~/.config/minicloud/config.yaml,
else ` + defaultEndpoint + `. Several API replicas may be given, separated
by commas (--endpoint a:8640,b:8640): calls go to a live one.
With a cluster CA (--ca-cert, $MINICLOUD_CA_CERT or "ca:" in the config
file, a PEM file such as the API's DATA_DIR/ca.crt) the CLI speaks TLS and
trusts only that CA; without one it speaks plaintext (the all-in-one on
loopback).

Exit codes: 0 ok, 1 error, 2 usage or invalid argument, 3 not found,
4 already exists, 5 conflict or failed precondition, 6 unavailable or timeout.`,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	a.root = root
	groupCommand(root)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usagef("%v (see '%s --help')", err, c.CommandPath())
	})
	root.PersistentFlags().StringVar(&a.endpointFlag, "endpoint", "", "API server address host:port, or several API replicas separated by commas (default $MINICLOUD_ENDPOINT, config file, or "+defaultEndpoint+")")
	root.PersistentFlags().StringVar(&a.caFlag, "ca-cert", "", "cluster CA certificate (PEM) to trust: speak TLS to the API (default $MINICLOUD_CA_CERT or \"ca:\" in the config file; none: plaintext)")
	root.PersistentFlags().StringVar(&a.projectFlag, "project", "", "project (default $MINICLOUD_PROJECT, config file, or \""+defaultProject+"\")")
	root.AddCommand(
		a.newVMCommand(),
		a.newImageCommand(),
		a.newFlavorCommand(),
		a.newNetworkCommand(),
		a.newServerGroupCommand(),
		a.newHostCommand(),
		a.newQuotaCommand(),
	)
	return root
}

// groupCommand makes a command that only holds subcommands refuse unknown
// subcommands with a usage error (cobra would print help and exit 0).
func groupCommand(c *cobra.Command) *cobra.Command {
	c.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usagef("unknown command %q for %q (see '%s --help')", args[0], cmd.CommandPath(), cmd.CommandPath())
		}
		return nil
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	return c
}

// exactArgs requires the named positional arguments.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != len(names) {
			return usagef("%s takes %d argument(s): %v, got %d (see '%s --help')", cmd.CommandPath(), len(names), names, len(args), cmd.CommandPath())
		}
		return nil
	}
}

// noArgs refuses positional arguments.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

// config is ~/.config/minicloud/config.yaml.
type config struct {
	Endpoint string `json:"endpoint"`
	// Endpoints lists the API replicas of one cluster (instead of Endpoint).
	Endpoints []string `json:"endpoints"`
	Project   string   `json:"project"`
	// CA is the path of the cluster CA certificate (PEM); set, the CLI
	// speaks TLS.
	CA string `json:"ca,omitempty"`
}

func (a *app) configPath() string {
	if p := a.getenv("MINICLOUD_CONFIG"); p != "" {
		return p
	}
	dir := a.getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home := a.getenv("HOME")
		if home == "" {
			return ""
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "minicloud", "config.yaml")
}

func (a *app) loadConfig() (config, error) {
	var c config
	p := a.configPath()
	if p == "" {
		return c, nil
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return c, usagef("config file %s: %v", p, err)
	}
	if c.Endpoint != "" && len(c.Endpoints) > 0 {
		return c, usagef("config file %s: give either endpoint or endpoints, not both", p)
	}
	for _, e := range c.Endpoints {
		if e == "" || strings.Contains(e, ",") {
			return c, usagef("config file %s: endpoints: %q must be one host:port per list item", p, e)
		}
	}
	return c, nil
}

// settings resolves endpoint and project: flag, environment, config file,
// default, in that order.
func (a *app) settings() (endpoint, project string, err error) {
	endpoint, project, _, err = a.allSettings()
	return endpoint, project, err
}

// allSettings is settings and the CA file.
func (a *app) allSettings() (endpoint, project, ca string, err error) {
	cfg, err := a.loadConfig()
	if err != nil {
		return "", "", "", err
	}
	first := func(vals ...string) string {
		for _, v := range vals {
			if v != "" {
				return v
			}
		}
		return ""
	}
	endpoint = first(a.endpointFlag, a.getenv("MINICLOUD_ENDPOINT"), strings.Join(cfg.Endpoints, ","), cfg.Endpoint, defaultEndpoint)
	project = first(a.projectFlag, a.getenv("MINICLOUD_PROJECT"), cfg.Project, defaultProject)
	ca = first(a.caFlag, a.getenv("MINICLOUD_CA_CERT"), cfg.CA)
	return endpoint, project, ca, nil
}

func (a *app) project() string {
	_, p, err := a.settings()
	if err != nil {
		return defaultProject
	}
	return p
}

// connect returns the API client, dialling on first use.
func (a *app) connect(ctx context.Context) (*client.Client, error) {
	if a.client != nil {
		return a.client, nil
	}
	endpoint, _, ca, err := a.allSettings()
	if err != nil {
		return nil, err
	}
	a.endpoint = endpoint
	var opts []grpc.DialOption
	if ca != "" {
		creds, err := caCredentials(ca)
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.WithTransportCredentials(creds))
	}
	c, err := client.Dial(ctx, endpoint, opts...)
	if err != nil {
		return nil, err
	}
	a.client = c
	return c, nil
}

// caCredentials trusts only the cluster CA in file, and only a
// control-plane certificate signed by it (a host's certificate, signed by
// the same CA, cannot pass for the API).
func caCredentials(file string) (credentials.TransportCredentials, error) {
	cfg, err := pki.ClientTLSFromFile(file)
	if err != nil {
		return nil, usagef("%v", err)
	}
	return credentials.NewTLS(cfg), nil
}
