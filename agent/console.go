package agent

import (
	"context"
	"errors"
	"io"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/agent/consolehub"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// knownVM refuses VMs this host does not run: the API only relays to a
// VM's own host, and nothing else may be reached through the agent.
func (s *AgentService) knownVM(id string) error {
	_, err := s.vmName(id)
	return err
}

// vmName is the name of one of this host's VMs, for messages.
func (s *AgentService) vmName(id string) (string, error) {
	s.agent.mu.Lock()
	as, known := s.agent.assigned[id]
	s.agent.mu.Unlock()
	if !known {
		return "", errdefs.NotFound("VM %s is not on host %s", id, s.agent.cfg.HostName)
	}
	return as.vm.GetMeta().GetName(), nil
}

// AttachConsole serves one console session (VMService.AttachConsole,
// relayed by the API) from the hub.
func (s *AgentService) AttachConsole(stream minicloudv1.AgentService_AttachConsoleServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	att := first.GetAttach()
	if att == nil {
		return errdefs.Invalid("the first message of AttachConsole must be an attach")
	}
	name, err := s.vmName(att.GetVmId())
	if err != nil {
		return err
	}
	sess, err := s.agent.consoles.Attach(ctx, att.GetVmId(), consolehub.AttachOptions{
		Write: att.GetWrite(), TakeOver: att.GetTakeOver(), Who: att.GetWho(), VMName: name,
	})
	if err != nil {
		return err
	}
	defer sess.Detach()
	log := s.agent.log.With("vm", att.GetVmId(), "who", att.GetWho(), "write", att.GetWrite())
	log.Info("console session attached")
	defer log.Info("console session detached")
	if err := stream.Send(&minicloudv1.ConsoleResponse{Msg: &minicloudv1.ConsoleResponse_Attached{Attached: &minicloudv1.ConsoleAttached{
		VmId: att.GetVmId(), Host: s.agent.cfg.HostName, Writer: sess.Writer(),
		ReplayedBytes: int64(sess.Replayed), Readers: int32(sess.Readers),
	}}}); err != nil {
		return err
	}

	// Input: until the client closes its side (detach) or breaks. Input
	// from a session that only reads (it never wrote, or was taken over)
	// is dropped and it is told once: it goes on watching.
	inErr := make(chan error, 1)
	go func() {
		told := false
		for {
			m, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				inErr <- nil
				return
			}
			if err != nil {
				inErr <- err
				return
			}
			err = sess.Write(m.GetData())
			switch {
			case err == nil:
				told = false
			case errdefs.IsFailedPrecondition(err):
				if !told {
					sess.Notify("this session only watches: what you type is not sent (attach again with take-over to type)")
					told = true
				}
			default:
				inErr <- err
				return
			}
		}
	}()
	return relayConsole(ctx, sess, inErr, stream.Send)
}

// relayConsole sends a session's events until it ends, the input side ends
// (detach: nil; an error), or ctx does.
func relayConsole(ctx context.Context, sess *consolehub.Session, inErr <-chan error, send func(*minicloudv1.ConsoleResponse) error) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-inErr:
			return err
		case ev, ok := <-sess.Events():
			if !ok {
				return nil
			}
			var m *minicloudv1.ConsoleResponse
			switch {
			case ev.Closed != "":
				m = &minicloudv1.ConsoleResponse{Msg: &minicloudv1.ConsoleResponse_Closed{Closed: &minicloudv1.ConsoleClosed{Reason: ev.Closed}}}
			case ev.WriterLost || (ev.Message != "" && ev.Data == nil):
				m = &minicloudv1.ConsoleResponse{Msg: &minicloudv1.ConsoleResponse_Notice{Notice: &minicloudv1.ConsoleNotice{WriterLost: ev.WriterLost, Message: ev.Message}}}
			default:
				m = &minicloudv1.ConsoleResponse{Msg: &minicloudv1.ConsoleResponse_Data{Data: ev.Data}}
			}
			if err := send(m); err != nil {
				return err
			}
		}
	}
}

// GetVMStats samples one of this host's VMs.
func (s *AgentService) GetVMStats(ctx context.Context, req *minicloudv1.AgentVMStatsRequest) (*minicloudv1.VMStats, error) {
	if err := s.knownVM(req.GetVmId()); err != nil {
		return nil, err
	}
	st, err := s.agent.hv.Stats(ctx, req.GetVmId())
	if err != nil {
		return nil, err
	}
	out := &minicloudv1.VMStats{
		VmId: req.GetVmId(), Host: s.agent.cfg.HostName, Time: timestamppb.New(st.Time),
		CpuTimeNs: st.CPUTimeNs, Vcpus: int32(st.VCPUs),
		MemoryActualKib: st.MemoryActualKiB, MemoryRssKib: st.MemoryRSSKiB,
		MemoryAvailableKib: st.MemoryAvailableKiB, MemoryUnusedKib: st.MemoryUnusedKiB,
	}
	for _, d := range st.Disks {
		out.Disks = append(out.Disks, &minicloudv1.VMDiskStats{Device: d.Device, ReadBytes: d.ReadBytes, ReadOps: d.ReadOps, WriteBytes: d.WriteBytes, WriteOps: d.WriteOps})
	}
	for _, n := range st.Interfaces {
		out.Interfaces = append(out.Interfaces, &minicloudv1.VMInterfaceStats{
			Device: n.Device, RxBytes: n.RxBytes, RxPackets: n.RxPackets, RxDrops: n.RxDrops, RxErrors: n.RxErrors,
			TxBytes: n.TxBytes, TxPackets: n.TxPackets, TxDrops: n.TxDrops, TxErrors: n.TxErrors,
		})
	}
	return out, nil
}
