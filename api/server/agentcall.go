package server

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// vmAgent is a connection to the agent of the host a VM is on, for the
// calls only that host can answer (console, stats).
type vmAgent struct {
	client minicloudv1.AgentServiceClient
	conn   *grpc.ClientConn
	vm     *minicloudv1.VM
	host   *minicloudv1.Host
}

func (a *vmAgent) Close() { a.conn.Close() }

// dialVMAgent finds ref's VM and connects to its host's agent. With
// running, a VM that is not RUNNING is refused with FailedPrecondition
// before any host is asked.
func (s *Server) dialVMAgent(ctx context.Context, project, ref string, running bool) (*vmAgent, error) {
	vm, err := s.lookupVM(ctx, project, ref)
	if err != nil {
		return nil, err
	}
	phase := vm.GetStatus().GetPhase()
	switch {
	case !running || phase == minicloudv1.VMPhase_VM_PHASE_RUNNING:
	case phase == minicloudv1.VMPhase_VM_PHASE_STOPPED:
		return nil, errdefs.FailedPrecondition("VM %s is STOPPED; start it first (minicloud vm start %s)", vm.Meta.Name, vm.Meta.Name)
	default:
		return nil, errdefs.FailedPrecondition("VM %s is %s: only a RUNNING VM has a console and counters", vm.Meta.Name, lifecycle.PhaseName(phase))
	}
	hostName := vm.GetStatus().GetHost()
	if hostName == "" {
		return nil, errdefs.FailedPrecondition("VM %s is not on a host yet (phase %s)", vm.Meta.Name, lifecycle.PhaseName(phase))
	}
	host, err := s.getHost(ctx, hostName)
	if err != nil {
		return nil, err
	}
	// Every agent joined the cluster and serves mTLS with its host
	// certificate; the API presents its control-plane certificate.
	if s.agentTLS == nil {
		return nil, errdefs.FailedPrecondition("this API server has no control-plane certificate (Config.AgentTLS): it cannot call agents")
	}
	creds := credentials.NewTLS(s.agentCredentials(hostName))
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, s.agentOpt...)
	conn, err := grpc.NewClient(host.GetAddress(), opts...)
	if err != nil {
		return nil, errdefs.Unavailable("host %s at %s: %v", hostName, host.GetAddress(), err)
	}
	return &vmAgent{client: minicloudv1.NewAgentServiceClient(conn), conn: conn, vm: vm, host: host}, nil
}

// agentError turns an agent's answer into the API's: a host that cannot be
// reached is UNAVAILABLE naming it, anything else keeps its code.
func (a *vmAgent) agentError(what string, err error) error {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Unimplemented:
		return errdefs.Unavailable("host %s (agent at %s, state %s) cannot be reached for the %s of VM %s: %v",
			a.host.Meta.Name, a.host.GetAddress(), a.host.GetState(), what, a.vm.Meta.Name, status.Convert(err).Message())
	}
	return errdefs.FromGRPC(err)
}
