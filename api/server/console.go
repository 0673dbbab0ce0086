package server

import (
	"context"
	"errors"
	"io"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// AttachConsole relays a console session to the agent of the VM's host,
// which shares the VM's one hypervisor console among its sessions. The
// write side was authorized on the header (auth.Policy: member with write).
func (v *vmService) AttachConsole(stream minicloudv1.VMService_AttachConsoleServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	att := first.GetAttach()
	if att == nil {
		return errdefs.Invalid("the first message of AttachConsole must be an attach naming the VM")
	}
	project, err := projectOf(att.GetProject())
	if err != nil {
		return err
	}
	a, err := v.s.dialVMAgent(ctx, project, att.GetName(), true)
	if err != nil {
		return err
	}
	defer a.Close()

	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	up, err := a.client.AttachConsole(actx)
	if err != nil {
		return a.agentError("console", err)
	}
	who := "unknown"
	if p := auth.FromContext(ctx); p != nil {
		who = p.String()
	}
	if err := up.Send(&minicloudv1.AgentConsoleRequest{Msg: &minicloudv1.AgentConsoleRequest_Attach{Attach: &minicloudv1.AgentConsoleAttach{
		VmId: a.vm.Meta.Id, Write: att.GetWrite(), TakeOver: att.GetTakeOver(), Who: who,
	}}}); err != nil {
		return a.agentError("console", recvErr(up))
	}
	// The agent's first answer says whether the session is attached.
	m, err := up.Recv()
	if err != nil {
		return a.agentError("console", err)
	}
	if err := stream.Send(m); err != nil {
		return err
	}

	// Input: client -> agent, until the client closes its side (detach),
	// which is passed on.
	inErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				inErr <- up.CloseSend()
				return
			}
			if err != nil {
				inErr <- err
				return
			}
			data := m.GetData()
			if m.GetAttach() != nil {
				inErr <- errdefs.Invalid("a console stream attaches once: only its first message is an attach")
				return
			}
			if err := up.Send(&minicloudv1.AgentConsoleRequest{Msg: &minicloudv1.AgentConsoleRequest_Data{Data: data}}); err != nil {
				// The agent ended the stream; its reason comes on Recv.
				inErr <- nil
				return
			}
		}
	}()
	// Output: agent -> client, until the agent ends the session.
	outErr := make(chan error, 1)
	go func() {
		for {
			m, err := up.Recv()
			if errors.Is(err, io.EOF) {
				outErr <- nil
				return
			}
			if err != nil {
				if ctx.Err() != nil {
					err = ctx.Err()
				} else {
					err = a.agentError("console", err)
				}
				outErr <- err
				return
			}
			if err := stream.Send(m); err != nil {
				outErr <- err
				return
			}
		}
	}()
	for {
		select {
		case err := <-outErr:
			return err
		case err := <-inErr:
			if err != nil {
				cancel() // ends the agent's side, and the output relay
				<-outErr
				return err
			}
			inErr = nil // detached: the agent ends its side next
		}
	}
}

// recvErr is the status a stream ended with after a failed Send.
func recvErr(s interface {
	Recv() (*minicloudv1.ConsoleResponse, error)
}) error {
	_, err := s.Recv()
	if err == nil || errors.Is(err, io.EOF) {
		return errdefs.Unavailable("the agent closed the console stream")
	}
	return err
}

// GetVMStats asks the VM's host for its counters.
func (v *vmService) GetVMStats(ctx context.Context, req *minicloudv1.GetVMStatsRequest) (*minicloudv1.VMStats, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	a, err := v.s.dialVMAgent(ctx, project, req.GetName(), true)
	if err != nil {
		return nil, err
	}
	defer a.Close()
	cctx, cancel := context.WithTimeout(ctx, agentCallTimeout)
	defer cancel()
	st, err := a.client.GetVMStats(cctx, &minicloudv1.AgentVMStatsRequest{VmId: a.vm.Meta.Id})
	if err != nil {
		return nil, a.agentError("stats", err)
	}
	return st, nil
}
