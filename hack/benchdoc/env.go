package benchdoc

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/minicloud/minicloud/pkg/etcdembed"
)

// LoadAverage is the 1-minute load average: the machine is shared, and the
// numbers mean little without it.
func LoadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Fields(string(b))[0]
}

// LoadAverages is the 1-, 5- and 15-minute load averages, space separated.
func LoadAverages() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// EmbeddedEtcd starts an etcd in a temporary directory named after the
// harness and returns a client; stop closes both and removes the data.
func EmbeddedEtcd(ctx context.Context, harness string) (cli *clientv3.Client, stop func(), err error) {
	dir, err := os.MkdirTemp("", harness+"-")
	if err != nil {
		return nil, nil, err
	}
	etcd, err := etcdembed.Start(ctx, etcdembed.Config{Dir: dir + "/etcd", ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0", Quiet: true})
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	cli, err = etcd.Client()
	if err != nil {
		etcd.Close()
		os.RemoveAll(dir)
		return nil, nil, err
	}
	return cli, func() { cli.Close(); etcd.Close(); os.RemoveAll(dir) }, nil
}

// ProcessCPU is the user and system CPU time this process has used: on a
// shared machine, CPU per operation moves less with the other tenants'
// load than wall time does.
func ProcessCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// CPUProfile starts a CPU profile written to path (none if path is
// empty); the returned function stops it.
func CPUProfile(path string) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// WriteAllocs writes the process's allocation profile so far to path. Two
// of them, before and after a phase, give the phase's own allocations:
// go tool pprof -sample_index=alloc_space -diff_base BEFORE AFTER.
func WriteAllocs(path string) error {
	// The profile is as of the last collection: make that now.
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}
