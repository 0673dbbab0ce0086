// Command minicloud is the minicloud CLI. Its commands, flags, output
// formats and exit codes are a contract scripts rely on (docs/cli.md).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], newIO(os.Stdin, os.Stdout, os.Stderr), os.Getenv)
	stop()
	os.Exit(code)
}
