package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/store"
)

// Reaching a VM: ssh to its address from a machine that routes to it, and
// port forwards (DNAT on its host) for everyone else (docs/networking.md,
// "Port forwards").

// parseForward reads HOSTPORT:GUESTPORT[/tcp|udp].
func parseForward(s string) (*minicloudv1.PortForward, error) {
	ports, proto, _ := strings.Cut(s, "/")
	p, err := parseProtocol(proto)
	if err != nil {
		return nil, err
	}
	h, g, ok := strings.Cut(ports, ":")
	hp, err1 := strconv.ParseInt(h, 10, 32)
	gp, err2 := strconv.ParseInt(g, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return nil, usagef("--port %q: want HOSTPORT:GUESTPORT[/tcp|udp], e.g. 20080:80", s)
	}
	return &minicloudv1.PortForward{Protocol: p, HostPort: int32(hp), GuestPort: int32(gp)}, nil
}

// parseHostPort reads HOSTPORT[/tcp|udp].
func parseHostPort(s string) (int32, minicloudv1.PortProtocol, error) {
	port, proto, _ := strings.Cut(s, "/")
	p, err := parseProtocol(proto)
	if err != nil {
		return 0, 0, err
	}
	n, err := strconv.ParseInt(port, 10, 32)
	if err != nil {
		return 0, 0, usagef("--port %q: want HOSTPORT[/tcp|udp], e.g. 20080", s)
	}
	return int32(n), p, nil
}

func parseProtocol(s string) (minicloudv1.PortProtocol, error) {
	switch s {
	case "", "tcp":
		return minicloudv1.PortProtocol_PORT_PROTOCOL_TCP, nil
	case "udp":
		return minicloudv1.PortProtocol_PORT_PROTOCOL_UDP, nil
	}
	return 0, usagef("protocol %q: want tcp or udp", s)
}

// forwardLine is one forward as vm show and vm expose print it.
func forwardLine(vm *minicloudv1.VM, f *minicloudv1.PortForward) string {
	guest := "the VM (no address yet)"
	if addrs := vm.GetStatus().GetAddresses(); len(addrs) > 0 {
		guest = addrs[0].GetIp()
	}
	return fmt.Sprintf("%d/%s -> %s:%d", f.GetHostPort(), store.ProtocolName(f.GetProtocol()), guest, f.GetGuestPort())
}

// hostAddress is the address clients reach the VM's host at: the host
// part of its agent address, when that is a specific address.
func hostAddress(ctx context.Context, c *client.Client, host string) string {
	if host == "" {
		return ""
	}
	h, err := c.Hosts.GetHost(ctx, &minicloudv1.GetHostRequest{Name: host})
	if err != nil {
		return ""
	}
	ip, _, err := net.SplitHostPort(h.GetAddress())
	if a, perr := netip.ParseAddr(ip); err != nil || perr != nil || a.IsUnspecified() {
		return ""
	}
	return ip
}

func (a *app) newVMExposeCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "expose NAME --port HOSTPORT:GUESTPORT[/tcp|udp]",
		Short: "Forward a port of the VM's host to a port of the VM",
		Long: `Forward traffic that reaches the VM's host (any of its addresses, on any
interface but the guest bridges) on HOSTPORT to GUESTPORT of the VM's
primary address. The host port is taken for the whole cluster: one already
forwarded to another VM is refused (exit 4). HOSTPORT must be in the
cluster's forward range (20000-32767 unless the operator changed it with
minicloudd api --port-forward-range). The forward follows the VM if it is
rebuilt on another host (evacuation): connect to its new host then.`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	port := cmd.Flags().String("port", "", "HOSTPORT:GUESTPORT[/tcp|udp] (tcp by default)")
	version := cmd.Flags().Int64("resource-version", 0, "only change the VM if it is still at this resource version")
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "port"); err != nil {
			return err
		}
		fwd, err := parseForward(*port)
		if err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		vm, err := c.VMs.ExposeVMPort(cmd.Context(), &minicloudv1.ExposeVMPortRequest{
			Name: args[0], Project: a.project(), Forward: fwd, ResourceVersion: *version,
		})
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, vm, func(w io.Writer) error {
			host := vm.GetStatus().GetHost()
			where := "its host, once it has one"
			if host != "" {
				where = "host " + host
				if ip := hostAddress(cmd.Context(), c, host); ip != "" {
					where += " (" + net.JoinHostPort(ip, strconv.Itoa(int(fwd.GetHostPort()))) + ")"
				}
			}
			_, err := fmt.Fprintf(w, "vm %s: %s on %s\n", args[0], forwardLine(vm, fwd), where)
			return err
		})
	}
	return cmd
}

func (a *app) newVMUnexposeCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:               "unexpose NAME --port HOSTPORT[/tcp|udp]",
		Short:             "Remove a port forward of a VM",
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	port := cmd.Flags().String("port", "", "HOSTPORT[/tcp|udp] of the forward (tcp by default)")
	version := cmd.Flags().Int64("resource-version", 0, "only change the VM if it is still at this resource version")
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "port"); err != nil {
			return err
		}
		hp, proto, err := parseHostPort(*port)
		if err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		vm, err := c.VMs.UnexposeVMPort(cmd.Context(), &minicloudv1.UnexposeVMPortRequest{
			Name: args[0], Project: a.project(), Protocol: proto, HostPort: hp, ResourceVersion: *version,
		})
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, vm, func(w io.Writer) error {
			_, err := fmt.Fprintf(w, "vm %s: host port %d/%s no longer forwarded\n", args[0], hp, store.ProtocolName(proto))
			return err
		})
	}
	return cmd
}

func (a *app) newVMSSHCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ssh NAME [-l USER] [-i KEY] [-- SSH-ARGS... [COMMAND]]",
		Short: "Run ssh to the VM's address as its image's default user",
		Long: `Run the system's ssh to the VM's primary address, as the default user of
its image (minicloud image show: "debian" for Debian cloud images, root when
the image names none) unless -l says otherwise. Everything after -- goes to
ssh after the destination: more ssh options and/or a remote command.

The VM's address is on its network, which only the VM's host (and, for a
network spanning hosts, the other hosts of that network) routes to. Run this
on such a host. From anywhere else, forward a port of the host to the VM's
port 22 and ssh to the host:

    minicloud vm expose NAME --port 20022:22
    ssh -p 20022 USER@HOST-ADDRESS

Known host keys are recorded under the VM's id (HostKeyAlias), not its
address, so an address reused by a later VM never shows up as a changed key.`,
		ValidArgsFunction: complete,
	}
	user := cmd.Flags().StringP("login", "l", "", "user to log in as (default: the image's default user)")
	identity := cmd.Flags().StringP("identity", "i", "", "private key file, passed to ssh -i")
	cmd.Args = func(cmd *cobra.Command, args []string) error {
		n := cmd.ArgsLenAtDash()
		if n < 0 {
			n = len(args)
		}
		if n != 1 {
			return usagef("%s takes one argument, NAME, before any --, got %d (see '%s --help')", cmd.CommandPath(), n, cmd.CommandPath())
		}
		return nil
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		name, extra := args[0], args[1:]
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		vm, err := c.VMs.GetVM(cmd.Context(), &minicloudv1.GetVMRequest{Name: name, Project: a.project()})
		if err != nil {
			return err
		}
		addrs := vm.GetStatus().GetAddresses()
		if len(addrs) == 0 || addrs[0].GetIp() == "" {
			return usagef("vm %s has no address yet (phase %s): wait for it (`minicloud vm wait %s --for running`)", name, phaseOf(vm), name)
		}
		ip := addrs[0].GetIp()
		login := *user
		if login == "" {
			login = "root"
			img, err := c.Images.GetImage(cmd.Context(), &minicloudv1.GetImageRequest{Name: vm.GetSpec().GetImage(), Project: vm.GetMeta().GetProject()})
			if err == nil && img.GetDefaultUser() != "" {
				login = img.GetDefaultUser()
			}
		}
		if !onLink(ip) {
			fmt.Fprintf(a.errOut, "note: no interface of this machine is on %s's network (%s/%d); if ssh cannot connect, run this on host %s, or `minicloud vm expose %s --port 20022:22` and ssh -p 20022 to the host\n",
				name, ip, addrs[0].GetPrefixLength(), orDash(vm.GetStatus().GetHost()), name)
		}
		argv := []string{"ssh", "-o", "HostKeyAlias=minicloud-" + vm.GetMeta().GetId(), "-l", login}
		if *identity != "" {
			argv = append(argv, "-i", *identity)
		}
		argv = append(argv, ip)
		argv = append(argv, extra...)
		bin, err := exec.LookPath("ssh")
		if err != nil {
			return fmt.Errorf("ssh is not installed here (Debian: apt install openssh-client): %w", err)
		}
		// exec, not a child: ssh owns the terminal, the exit code is ssh's.
		return syscall.Exec(bin, argv, os.Environ())
	}
	return cmd
}

// onLink reports whether one of this machine's interfaces has an address
// in a prefix that contains ip (the VM's bridge is on this host).
func onLink(ip string) bool {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return false
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true // cannot tell: say nothing
	}
	for _, ad := range addrs {
		n, ok := ad.(*net.IPNet)
		if !ok {
			continue
		}
		p, err := netip.ParsePrefix(n.String())
		if err == nil && p.Bits() < 32 && p.Contains(a) {
			return true
		}
	}
	return false
}
