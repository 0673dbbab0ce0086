package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/minicloud/minicloud/pkg/client"
)

// The list, show and delete commands of every resource have the same
// shape; these build them from the one call and the one table that differ.

// listCommand builds "list" with -o.
func listCommand[T proto.Message](a *app, short string, list func(context.Context, *client.Client) (T, error), table func(io.Writer, T) error) *cobra.Command {
	cmd := &cobra.Command{Use: "list", Short: short, Args: noArgs}
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := list(cmd.Context(), c)
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, resp, func(w io.Writer) error { return table(w, resp) })
	}
	return cmd
}

// showCommand builds "show NAME" with -o.
func showCommand[T proto.Message](a *app, short string, complete cobra.CompletionFunc, get func(context.Context, *client.Client, string) (T, error), details func(io.Writer, T) error) *cobra.Command {
	cmd := &cobra.Command{Use: "show NAME", Short: short, Args: exactArgs("NAME"), ValidArgsFunction: complete}
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		obj, err := get(cmd.Context(), c, args[0])
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, obj, func(w io.Writer) error { return details(w, obj) })
	}
	return cmd
}

// nameCommand builds "<verb> NAME" that calls do and then prints
// "<kind> NAME <done>".
func nameCommand(a *app, verb, short, kind, done string, complete cobra.CompletionFunc, do func(context.Context, *client.Client, string) error) *cobra.Command {
	cmd := &cobra.Command{Use: verb + " NAME", Short: short, Args: exactArgs("NAME"), ValidArgsFunction: complete}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		if err := do(cmd.Context(), c, args[0]); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "%s %s %s\n", kind, args[0], done)
		return nil
	}
	return cmd
}

// ignoreResult adapts an RPC that returns a message to nameCommand.
func ignoreResult[T any](_ T, err error) error { return err }

// callCommand gives cmd an -o flag and a RunE that connects, makes one
// call with the arguments, and prints its answer with text (or as JSON or
// YAML).
func callCommand[T proto.Message](a *app, cmd *cobra.Command, call func(context.Context, *client.Client, []string) (T, error), text func(io.Writer, T, []string) error) {
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := call(cmd.Context(), c, args)
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, resp, func(w io.Writer) error { return text(w, resp, args) })
	}
}
