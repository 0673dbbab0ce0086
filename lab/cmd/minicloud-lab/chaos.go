package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/minicloud/minicloud/lab"
	"github.com/minicloud/minicloud/lab/invariants"
)

// chaos runs `hack/lab chaos audit|...` (hack/chaos is the short form).
func chaos(ctx context.Context, dir string, args []string) (int, error) {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2, nil
	}
	switch cmd, args := args[0], args[1:]; cmd {
	case "audit":
		l, err := lab.Load(dir, os.Stderr)
		if err != nil {
			return 1, err
		}
		return audit(ctx, l, args)
	case "run":
		return runChaos(ctx, args)
	default:
		fmt.Fprint(os.Stderr, usage)
		return 2, fmt.Errorf("unknown chaos command %q", cmd)
	}
}

// audit checks the lab's invariants (lab/invariants) and prints the
// violations; exit status 1 if there are any.
func audit(ctx context.Context, l *lab.Lab, args []string) (int, error) {
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	settle := fs.Duration("settle", 0, "how long the cloud may take to converge")
	deleted := fs.String("deleted", "", "comma-separated ids of deleted VMs")
	if err := fs.Parse(args); err != nil {
		return 2, nil
	}
	var ids []string
	if *deleted != "" {
		ids = strings.Split(*deleted, ",")
	}
	r, err := auditOnce(ctx, l, invariants.Options{Deleted: ids, Settle: *settle})
	if err != nil {
		return 1, err
	}
	fmt.Println(r)
	if len(r.Violations) > 0 {
		return 1, nil
	}
	return 0, nil
}

// auditOnce runs the auditor against l with a fresh etcd client.
func auditOnce(ctx context.Context, l *lab.Lab, opts invariants.Options) (invariants.Report, error) {
	etcd, err := l.EtcdClient()
	if err != nil {
		return invariants.Report{}, err
	}
	defer etcd.Close()
	ctx, cancel := context.WithTimeout(ctx, opts.Settle+2*time.Minute)
	defer cancel()
	return invariants.Audit(ctx, etcd, invariants.LabHosts{Lab: l}, opts)
}
