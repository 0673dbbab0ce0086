package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// metadataUpdates is the "metadata-updates" measurement (-metadata-updates
// N): one tiny guest follows a GCE attribute with wait_for_change
// (mc-guestprobe's watch, asked for by the mc-watch attribute); each
// update sets that attribute through UpdateVMMetadata, and is timed from
// just before the RPC is sent until the guest's answer carrying the new
// value reaches its serial console (the console file on this host, polled
// every millisecond). That is the whole path: API, etcd, assignment
// stream, agent, metadata directory, the guest's long-poll, the guest
// printing it.
type metadataUpdates struct {
	visible, rpc []time.Duration
	loadBefore   string
	loadAfter    string
	hypervisor   string
	started      time.Time
}

const watchVM = "metawatch"

func (b *bench) measureMetadataUpdates(ctx context.Context, n int) (*metadataUpdates, error) {
	m := &metadataUpdates{}
	if _, err := b.cloud.client.VMs.CreateVM(ctx, &minicloudv1.CreateVMRequest{Name: watchVM, Spec: &minicloudv1.VMSpec{
		Image: "tiny", Flavor: "tiny",
		// A poll that times out answers unchanged; 300 s keeps those out
		// of the way of the measured answers.
		Metadata: map[string]string{"mc-watch": "greeting", "mc-watch-timeout": "300", "greeting": "v0"},
	}}); err != nil {
		return nil, fmt.Errorf("create %s: %w", watchVM, err)
	}
	if err := b.watch.wait(ctx, []string{watchVM}, "running", func(st *vmState) bool { return !st.running.IsZero() }); err != nil {
		return nil, err
	}
	m.hypervisor = b.watch.state(watchVM).vm.GetStatus().GetHypervisor()
	console := filepath.Join(b.cloud.dataDir, "agent", "vms", b.watch.state(watchVM).id, "console.log")
	logf("waiting for the guest to follow its attribute (%s)", console)
	off, err := waitConsole(ctx, console, 0, `value="v0"`, roundTimeout, 100*time.Millisecond)
	if err != nil {
		return nil, err
	}
	m.loadBefore, m.started = loadAverage(), time.Now()
	for i := 1; i <= n; i++ {
		val := fmt.Sprintf("v%d", i)
		sent := time.Now()
		if _, err := b.cloud.client.VMs.UpdateVMMetadata(ctx, &minicloudv1.UpdateVMMetadataRequest{
			Name: watchVM, SetMetadata: map[string]string{"greeting": val},
		}); err != nil {
			return nil, fmt.Errorf("update %d: %w", i, err)
		}
		m.rpc = append(m.rpc, time.Since(sent))
		if off, err = waitConsole(ctx, console, off, `value="`+val+`"`, 30*time.Second, time.Millisecond); err != nil {
			return nil, fmt.Errorf("update %d: %w", i, err)
		}
		m.visible = append(m.visible, time.Since(sent))
	}
	m.loadAfter = loadAverage()
	return m, b.deleteVMs(ctx, []string{watchVM})
}

// waitConsole polls the console file from offset off until it holds want,
// and returns the offset just after it.
func waitConsole(ctx context.Context, path string, off int64, want string, timeout, every time.Duration) (int64, error) {
	deadline := time.Now().Add(timeout)
	var seen []byte
	for {
		f, err := os.Open(path)
		if err == nil {
			_, err = f.Seek(off, io.SeekStart)
			if err == nil {
				var b []byte
				b, err = io.ReadAll(f)
				seen = append(seen, b...)
				off += int64(len(b))
			}
			f.Close()
		}
		if err != nil && !os.IsNotExist(err) {
			return off, fmt.Errorf("read console %s: %w", path, err)
		}
		if i := bytes.Index(seen, []byte(want)); i >= 0 {
			return off - int64(len(seen)) + int64(i+len(want)), nil
		}
		if time.Now().After(deadline) {
			return off, fmt.Errorf("the guest's console did not show %s within %s; it showed %q", want, timeout, tail(string(seen), 400))
		}
		select {
		case <-ctx.Done():
			return off, ctx.Err()
		case <-time.After(every):
		}
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func (m *metadataUpdates) render() string {
	var b strings.Builder
	fmt.Fprintf(&b, "`go run ./hack/agentbench -metadata-updates %d` — one tiny guest under %s follows a GCE attribute with `wait_for_change` (mc-guestprobe); each of %d sequential `UpdateVMMetadata` calls sets it, timed from just before the RPC until the guest's long-poll answer with the new value is on its serial console (console file polled every 1 ms on the host). Real all-in-one: embedded etcd, API, agent, metadata service, libvirt/QEMU. Run %s, 2 cores, load average before %s, after %s.\n\n",
		len(m.visible), m.hypervisor, len(m.visible), m.started.UTC().Format("2006-01-02 15:04 UTC"), m.loadBefore, m.loadAfter)
	b.WriteString("| | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n")
	for _, row := range []struct {
		name string
		ds   []time.Duration
	}{{"update → guest's `wait_for_change` answer", m.visible}, {"`UpdateVMMetadata` RPC alone", m.rpc}} {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", row.name, ms(percentile(row.ds, 0.5)), ms(percentile(row.ds, 0.9)), ms(percentile(row.ds, 0.99)), ms(slices.Max(row.ds)))
	}
	return b.String()
}
