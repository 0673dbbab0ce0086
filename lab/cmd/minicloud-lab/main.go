// Command minicloud-lab brings a multi-host minicloud lab up on this
// machine and acts on it (hack/lab is its wrapper; docs/lab.md).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/minicloud/minicloud/lab"
)

const usage = `usage: hack/lab [--dir DIR] COMMAND [ARGS]

  up [--hosts N] [--name NAME] [--subnet CIDR] [--no-vms]
                       bring the lab up (make lab); idempotent
  down                 remove everything the lab made (make lab-down)
  status               the lab's processes and hosts
  stop HOST            power HOST off (kill -9 its agent, libvirtd, QEMUs)
  start HOST           boot HOST again (its agent restarts its VMs)
  partition HOST       cut HOST's underlay link
  heal HOST            restore HOST's underlay link
  exec HOST [-- CMD]   run CMD (default a shell) inside HOST, e.g.
                       hack/lab exec host1 -- virsh list
  env                  print the export line that points minicloud at the lab
  chaos audit [--settle D] [--deleted ID,...]
                       check the lab's invariants (hack/chaos audit): etcd
                       against every host's domains, taps, VM directories
                       and nftables port sets; retry for up to D (default
                       0: one snapshot) while the cloud converges; print
                       the last snapshot's violations, exit 1 if any.
                       --deleted: VM ids that must exist nowhere
  chaos run [--seed N] [--rounds N] [--settle D] [--docs FILE] [--keep]
                       make chaos: bring up a lab of its own (mclc,
                       /var/lib/minicloud-labchaos, 10.253.0.0/24), run
                       the chaos scenarios in a seeded random order, each
                       followed by the auditor; write the table into
                       FILE's chaos section; exit 1 on a lost VM, a
                       duplicate or a scenario that never recovered
`

func main() {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	code, err := run(ctx, os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "hack/lab:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func run(ctx context.Context, args []string) (int, error) {
	gfs := flag.NewFlagSet("lab", flag.ContinueOnError)
	dir := gfs.String("dir", envOr("LAB_DIR", lab.DefaultDir), "the lab's state directory")
	gfs.Usage = func() { fmt.Fprint(os.Stderr, usage) }
	if err := gfs.Parse(args); err != nil {
		return 2, nil
	}
	args = gfs.Args()
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2, nil
	}
	if os.Geteuid() != 0 {
		return 1, errors.New("must run as root (namespaces, bridges, libvirtd)")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "up":
		return 0, up(ctx, *dir, args)
	case "chaos":
		return chaos(ctx, *dir, args)
	case "down":
		l, err := lab.Load(*dir, os.Stderr)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				fmt.Fprintf(os.Stderr, "no lab in %s\n", *dir)
				return 0, nil
			}
			return 1, err
		}
		return 0, l.Down(ctx)
	}
	l, err := lab.Load(*dir, os.Stderr)
	if err != nil {
		return 1, err
	}
	host := func() (string, error) {
		if len(args) < 1 {
			return "", fmt.Errorf("%s needs a host (one of %s)", cmd, strings.Join(l.HostNames(), ", "))
		}
		return args[0], nil
	}
	switch cmd {
	case "status":
		return 0, l.PrintStatus(ctx, os.Stdout)
	case "env":
		fmt.Printf("export MINICLOUD_CONFIG=%s\n", l.CLIConfig())
		return 0, nil
	case "stop", "start", "partition", "heal":
		h, err := host()
		if err != nil {
			return 2, err
		}
		switch cmd {
		case "stop":
			return 0, l.StopHost(ctx, h)
		case "start":
			return 0, l.StartHost(ctx, h)
		case "partition":
			return 0, l.Partition(h)
		default:
			return 0, l.Heal(h)
		}
	case "exec":
		h, err := host()
		if err != nil {
			return 2, err
		}
		argv := args[1:]
		if len(argv) > 0 && argv[0] == "--" {
			argv = argv[1:]
		}
		c, err := l.Command(ctx, h, argv...)
		if err != nil {
			return 1, err
		}
		c.Stdin, c.Stdout, c.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := c.Run(); err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return ee.ExitCode(), nil
			}
			return 1, err
		}
		return 0, nil
	}
	fmt.Fprint(os.Stderr, usage)
	return 2, fmt.Errorf("unknown command %q", cmd)
}

func up(ctx context.Context, dir string, args []string) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	hosts := fs.Int("hosts", 0, "hypervisor hosts (default 3, or what the lab has)")
	name := fs.String("name", "", "prefix of namespaces and interfaces (default "+lab.DefaultName+")")
	subnet := fs.String("subnet", "", "underlay subnet (default "+lab.DefaultSubnet+")")
	noVMs := fs.Bool("no-vms", false, "do not boot a VM on every host")
	if err := fs.Parse(args); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	repo := envOr("LAB_REPO", filepath.Join(filepath.Dir(self), ".."))
	// The images `make up` and `make images` import: tiny always, debian
	// when it has been built.
	images := map[string]string{"tiny": filepath.Join(repo, "images/out/tiny")}
	if _, err := os.Stat(filepath.Join(repo, "images/out/debian/disk.qcow2")); err == nil {
		images["debian"] = filepath.Join(repo, "images/out/debian")
	}
	cfg := lab.Config{Dir: dir, BinDir: filepath.Dir(self), Images: images}
	// A lab that exists keeps its shape unless told otherwise.
	if old, err := lab.Load(dir, nil); err == nil {
		cfg = old.Config
		cfg.BinDir = filepath.Dir(self)
		cfg.Images = images
	}
	if *hosts != 0 {
		if cfg.Hosts != 0 && *hosts < cfg.Hosts {
			return fmt.Errorf("the lab has %d hosts; make lab-down first to make it smaller", cfg.Hosts)
		}
		cfg.Hosts = *hosts
	}
	if *name != "" {
		cfg.Name = *name
	}
	if *subnet != "" {
		p, err := netip.ParsePrefix(*subnet)
		if err != nil {
			return fmt.Errorf("--subnet: %w", err)
		}
		cfg.Subnet = p
	}
	cfg.NoVMs = cfg.NoVMs || *noVMs
	l, err := lab.New(cfg, os.Stderr)
	if err != nil {
		return err
	}
	if err := l.Up(ctx); err != nil {
		return fmt.Errorf("%w\n(logs in %s; make lab-down removes everything)", err, filepath.Join(l.Dir, "logs"))
	}
	if err := l.PrintStatus(ctx, os.Stdout); err != nil {
		return err
	}
	fmt.Printf(`
The lab is up. Point the minicloud CLI at it with:

  export MINICLOUD_CONFIG=%s

(unset MINICLOUD_CONFIG to go back to the all-in-one of make up.)
Look inside a host:  hack/lab exec host1 -- virsh list
Remove everything:   make lab-down
`, l.CLIConfig())
	return nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
