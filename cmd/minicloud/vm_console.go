package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// escapeByte detaches from a console: Ctrl-], as in telnet and virsh console.
const escapeByte = 0x1d

// consoleInputChunk is the most input one message carries (the API's limit).
const consoleInputChunk = 4096

func (a *app) newVMConsoleCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Attach your terminal to the VM's serial console (Ctrl-] detaches)",
		Long: `Attach your terminal to the VM's serial console (ttyS0), in raw mode:
every key goes to the guest, Ctrl-C included. Ctrl-] detaches and restores
the terminal. Output written shortly before you attached is shown first.

Any number of sessions may watch a console; one at a time types. A second
session that wants to type is refused unless it takes the console over
(--take-over), which leaves the first one watching. --read-only only
watches. Typing needs the member role in the VM's project; watching, reader.`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	readOnly := cmd.Flags().Bool("read-only", false, "only watch the console, do not type")
	takeOver := cmd.Flags().Bool("take-over", false, "type even if another session does (it is left watching)")
	cmd.MarkFlagsMutuallyExclusive("read-only", "take-over")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		ctx, cancel := context.WithCancel(cmd.Context())
		defer cancel()
		stream, err := c.VMs.AttachConsole(ctx)
		if err != nil {
			return err
		}
		if err := stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Attach{Attach: &minicloudv1.ConsoleAttach{
			Name: args[0], Project: a.project(), Write: !*readOnly, TakeOver: *takeOver,
		}}}); err != nil {
			_, err = stream.Recv() // the status says why
			return err
		}
		first, err := stream.Recv()
		if err != nil {
			return err
		}
		att := first.GetAttached()
		mode := "typing"
		if !att.GetWriter() {
			mode = "watching (read-only)"
		}
		fmt.Fprintf(a.errOut, "Connected to the console of VM %s on host %s, %s. Escape character is ^] (Ctrl-]).\n", args[0], att.GetHost(), mode)

		// Raw mode when stdin is a terminal; restored on every way out
		// (detach, the VM stopping, an error, a signal cancelling ctx).
		nl := "\n"
		if f, ok := a.in.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			state, err := term.MakeRaw(int(f.Fd()))
			if err != nil {
				return fmt.Errorf("put the terminal in raw mode: %w", err)
			}
			defer term.Restore(int(f.Fd()), state)
			nl = "\r\n"
		}

		go func() {
			copyConsoleInput(a.in, att.GetWriter(), func(p []byte) error {
				return stream.Send(&minicloudv1.ConsoleRequest{Msg: &minicloudv1.ConsoleRequest_Data{Data: p}})
			})
			// Ctrl-] or the end of input: detach; the server then ends the
			// stream.
			_ = stream.CloseSend()
		}()
		for {
			m, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				fmt.Fprintf(a.errOut, "%sDetached from the console of VM %s.%s", nl, args[0], nl)
				return nil
			}
			if err != nil {
				fmt.Fprint(a.errOut, nl)
				return err
			}
			switch m := m.Msg.(type) {
			case *minicloudv1.ConsoleResponse_Data:
				if _, err := a.out.Write(m.Data); err != nil {
					return err
				}
			case *minicloudv1.ConsoleResponse_Notice:
				fmt.Fprintf(a.errOut, "%s[minicloud: %s]%s", nl, m.Notice.GetMessage(), nl)
			case *minicloudv1.ConsoleResponse_Closed:
				fmt.Fprintf(a.errOut, "%s[minicloud: %s]%s", nl, m.Closed.GetReason(), nl)
			}
		}
	}
	return cmd
}

// copyConsoleInput sends what is typed until Ctrl-] (true) or the end of
// input (false). A watching session sends nothing but still ends on Ctrl-].
func copyConsoleInput(in io.Reader, write bool, send func([]byte) error) bool {
	buf := make([]byte, consoleInputChunk)
	for {
		n, err := in.Read(buf)
		p := buf[:n]
		i := bytes.IndexByte(p, escapeByte)
		if i >= 0 {
			p = p[:i]
		}
		if write && len(p) > 0 {
			if send(append([]byte(nil), p...)) != nil {
				return false // the stream ended; its status comes on Recv
			}
		}
		if i >= 0 {
			return true
		}
		if err != nil {
			return false
		}
	}
}
