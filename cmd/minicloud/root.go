package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/pki"
)

const (
	defaultEndpoint = "127.0.0.1:8640"
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
	tokenFlag    string
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
The API speaks TLS only: the CLI trusts the cluster CA given by --ca-cert,
$MINICLOUD_CA_CERT or "ca:" in the config file (a PEM file such as the
API's DATA_DIR/ca.crt), and sends the bearer token given by --token,
$MINICLOUD_TOKEN or "token:" in the config file. ` + "`make up`" + ` writes
all three into the config file for the admin.
The project is --project, $MINICLOUD_PROJECT or "project:" in the config
file; none: the caller's default project (see ` + "`minicloud whoami`" + `).

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
	root.PersistentFlags().StringVar(&a.projectFlag, "project", "", "project (default $MINICLOUD_PROJECT, config file, or your default project)")
	root.PersistentFlags().StringVar(&a.tokenFlag, "token", "", "bearer token (default $MINICLOUD_TOKEN or \"token:\" in the config file)")
	root.AddCommand(
		a.newVMCommand(),
		a.newImageCommand(),
		a.newFlavorCommand(),
		a.newNetworkCommand(),
		a.newServerGroupCommand(),
		a.newHostCommand(),
		a.newProjectCommand(),
		a.newUserCommand(),
		a.newTokenCommand(),
		a.newWhoAmICommand(),
		a.newAuditCommand(),
		a.newIdentityCommand(),
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

func (a *app) loadConfig() (client.Config, error) {
	p := a.configPath()
	if p == "" {
		return client.Config{}, nil
	}
	c, err := client.LoadConfig(p)
	if errors.Is(err, fs.ErrNotExist) {
		return client.Config{}, nil
	}
	if err != nil {
		return c, usagef("%v", err)
	}
	return c, nil
}

// settings resolves endpoint and project: flag, environment, config file,
// default, in that order.
func (a *app) settings() (endpoint, project string, err error) {
	endpoint, project, _, _, err = a.allSettings()
	return endpoint, project, err
}

// allSettings is settings, the CA file and the token.
func (a *app) allSettings() (endpoint, project, ca, token string, err error) {
	cfg, err := a.loadConfig()
	if err != nil {
		return "", "", "", "", err
	}
	first := func(vals ...string) string {
		for _, v := range vals {
			if v != "" {
				return v
			}
		}
		return ""
	}
	endpoint = first(a.endpointFlag, a.getenv("MINICLOUD_ENDPOINT"), cfg.EndpointList(), defaultEndpoint)
	project = first(a.projectFlag, a.getenv("MINICLOUD_PROJECT"), cfg.Project)
	ca = first(a.caFlag, a.getenv("MINICLOUD_CA_CERT"), cfg.CA)
	token = first(a.tokenFlag, a.getenv("MINICLOUD_TOKEN"), cfg.Token)
	return endpoint, project, ca, token, nil
}

// project is the project the user chose, or "" for the caller's default
// project (the API resolves it).
func (a *app) project() string {
	_, p, err := a.settings()
	if err != nil {
		return ""
	}
	return p
}

// connect returns the API client, dialling on first use.
func (a *app) connect(ctx context.Context) (*client.Client, error) {
	if a.client != nil {
		return a.client, nil
	}
	endpoint, _, ca, token, err := a.allSettings()
	if err != nil {
		return nil, err
	}
	a.endpoint = endpoint
	var opts []grpc.DialOption
	if token != "" {
		if ca == "" {
			return nil, usagef("a token is sent over TLS only: give the cluster CA with --ca-cert, $MINICLOUD_CA_CERT or \"ca:\" in the config file (the API writes it to DATA_DIR/ca.crt)")
		}
		opts = append(opts, client.WithToken(token))
	}
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
