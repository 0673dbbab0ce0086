package agent

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/minicloud/minicloud/agent/hypervisor"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/wait"
)

// runHostSession registers the host and keeps its heartbeat lease alive. If
// the API forgets the host (NotFound), it registers again.
func (a *Agent) runHostSession(ctx context.Context, caps hypervisor.HostCapabilities) error {
	backoff := time.Second
	for ctx.Err() == nil {
		interval, err := a.register(ctx, caps)
		if err != nil {
			a.log.Warn("register host; retrying", "err", err, "in", backoff)
			if !wait.Sleep(ctx, backoff) {
				return nil
			}
			backoff = min(backoff*2, 30*time.Second)
			continue
		}
		backoff = time.Second
		a.log.Info("host registered", "heartbeat_interval", interval)
		a.registeredOnce.Do(func() { close(a.registered) })
		err = a.heartbeat(ctx, interval)
		if ctx.Err() != nil {
			return nil
		}
		a.log.Warn("heartbeat stopped; registering again", "err", err)
	}
	return nil
}

func (a *Agent) register(ctx context.Context, caps hypervisor.HostCapabilities) (time.Duration, error) {
	diskGiB, err := freeDiskGiB(a.cfg.StateDir)
	if err != nil {
		return 0, err
	}
	capacity := &minicloudv1.Resources{Vcpus: int32(caps.VCPUs), MemoryMib: caps.MemoryMiB, DiskGib: diskGiB}
	if o := a.cfg.Capacity; o.VCPUs > 0 {
		capacity.Vcpus = int32(o.VCPUs)
	}
	if o := a.cfg.Capacity; o.MemoryMiB > 0 {
		capacity.MemoryMib = o.MemoryMiB
	}
	if o := a.cfg.Capacity; o.DiskGiB > 0 {
		capacity.DiskGib = o.DiskGiB
	}
	var tunnelIP string
	if a.cfg.TunnelIP.IsValid() {
		tunnelIP = a.cfg.TunnelIP.String()
	}
	resp, err := a.hosts.RegisterHost(ctx, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta:             &minicloudv1.ObjectMeta{Name: a.cfg.HostName},
		Address:          a.cfg.AdvertiseAddr,
		Capacity:         capacity,
		AllocationRatios: a.cfg.AllocationRatios,
		Hypervisors:      caps.Hypervisors,
		AvailabilityZone: a.cfg.AvailabilityZone,
		AgentVersion:     a.cfg.Version,
		TunnelIp:         tunnelIP,
		// Whole seconds, rounded up: the control plane's deadline must
		// not come before the agent's own.
		FenceAfterSeconds: int64((a.cfg.FenceAfter + time.Second - 1) / time.Second),
	}})
	if err != nil {
		return 0, fmt.Errorf("register host %s: %w", a.cfg.HostName, errdefs.FromGRPC(err))
	}
	interval := time.Duration(resp.GetHeartbeatIntervalSeconds()) * time.Second
	if interval <= 0 {
		interval = 5 * time.Second
	}
	// The first heartbeat makes the host UP at once.
	if _, err := a.hosts.Heartbeat(ctx, &minicloudv1.HeartbeatRequest{Name: a.cfg.HostName}); err != nil {
		return 0, fmt.Errorf("first heartbeat: %w", errdefs.FromGRPC(err))
	}
	a.contact()
	return interval, nil
}

// heartbeat returns when the API says the host is unknown; transient
// errors are retried until the lease would have expired anyway.
func (a *Agent) heartbeat(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		hctx, cancel := context.WithTimeout(ctx, interval)
		_, err := a.hosts.Heartbeat(hctx, &minicloudv1.HeartbeatRequest{Name: a.cfg.HostName})
		cancel()
		if err != nil {
			err = errdefs.FromGRPC(err)
			if errdefs.IsNotFound(err) {
				return err
			}
			a.log.Warn("heartbeat failed", "err", err)
			continue
		}
		a.contact()
	}
}

// freeDiskGiB is the capacity of the file system that holds VM disks.
func freeDiskGiB(dir string) (int64, error) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(fs.Blocks) * fs.Bsize >> 30, nil
}
