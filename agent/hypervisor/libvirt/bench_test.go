package libvirt_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/minicloud/minicloud/agent/hypervisor"
	"github.com/minicloud/minicloud/agent/hypervisor/libvirt"
)

// BenchmarkCreate compares, for the same domain XML (tiny image, TCG here),
// a raw `virsh create` with Define+Start through the driver, for 1 and 10
// concurrent creates. One iteration creates a batch and measures until every
// domain of it runs; disks and taps are prepared outside the timer and
// everything is destroyed after it.
//
//	go test -run '^$' -bench BenchmarkCreate -benchtime 3x ./agent/hypervisor/libvirt/
//
// Metrics: ms/create is the mean latency of one create (call to running),
// p50-ms and max-ms its distribution over all creates, batch-ms the wall
// time of a whole batch.
func BenchmarkCreate(b *testing.B) {
	requireLibvirt(b)
	for _, n := range []int{1, 10} {
		b.Run(fmt.Sprintf("virsh-create/concurrency=%d", n), func(b *testing.B) { benchCreate(b, n, virshCreate) })
		b.Run(fmt.Sprintf("driver-define-start/concurrency=%d", n), func(b *testing.B) { benchCreate(b, n, driverCreate) })
	}
}

type createFunc func(ctx context.Context, d hypervisor.Driver, spec hypervisor.DomainSpec, xmlPath string) error

func virshCreate(_ context.Context, _ hypervisor.Driver, _ hypervisor.DomainSpec, xmlPath string) error {
	out, err := exec.Command("virsh", "-c", "qemu:///system", "-q", "create", xmlPath).CombinedOutput()
	if err != nil {
		return fmt.Errorf("virsh create: %v: %s", err, out)
	}
	return nil
}

func driverCreate(ctx context.Context, d hypervisor.Driver, spec hypervisor.DomainSpec, _ string) error {
	if err := d.Define(ctx, spec); err != nil {
		return err
	}
	return d.Start(ctx, spec.VMID)
}

func benchCreate(b *testing.B, n int, create createFunc) {
	d := libvirt.New(libvirt.Options{})
	b.Cleanup(func() { _ = d.Close() })
	ctx := context.Background()
	var all []time.Duration
	var batches time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		specs := make([]hypervisor.DomainSpec, n)
		xmls := make([]string, n)
		for j := range specs {
			specs[j] = newSpec(b, uuid.NewString())
			x, err := libvirt.DomainXML(specs[j])
			if err != nil {
				b.Fatal(err)
			}
			xmls[j] = filepath.Join(filepath.Dir(specs[j].DiskPath), "domain.xml")
			if err := os.WriteFile(xmls[j], []byte(x), 0o644); err != nil {
				b.Fatal(err)
			}
		}
		lat := make([]time.Duration, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		b.StartTimer()
		start := time.Now()
		for j := range specs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				errs[j] = create(ctx, d, specs[j], xmls[j])
				lat[j] = time.Since(t0)
			}()
		}
		wg.Wait()
		batch := time.Since(start)
		b.StopTimer()
		for j, spec := range specs {
			if err := d.Undefine(ctx, spec.VMID); err != nil {
				b.Errorf("cleanup %s: %v", spec.VMID, err)
			}
			// virsh create makes a transient domain, invisible to the
			// driver (no undefine needed, but it must be stopped).
			_, _ = virsh("destroy", hypervisor.DomainName(spec.VMID))
			if errs[j] != nil {
				b.Fatalf("create %d: %v", j, errs[j])
			}
		}
		all = append(all, lat...)
		batches += batch
		b.StartTimer()
	}
	b.StopTimer()
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	var sum time.Duration
	for _, l := range all {
		sum += l
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(sum/time.Duration(len(all))), "ms/create")
	b.ReportMetric(ms(all[len(all)/2]), "p50-ms")
	b.ReportMetric(ms(all[len(all)-1]), "max-ms")
	b.ReportMetric(ms(batches/time.Duration(b.N)), "batch-ms")
}
