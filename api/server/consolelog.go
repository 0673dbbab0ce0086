package server

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

const (
	defaultConsoleTail = 64 << 10
	maxConsoleTail     = 1 << 20
	agentCallTimeout   = 10 * time.Second
)

// GetConsoleLog asks the VM's host for the serial console: only the host
// has it.
func (v *vmService) GetConsoleLog(ctx context.Context, req *minicloudv1.GetConsoleLogRequest) (*minicloudv1.GetConsoleLogResponse, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	tail := req.GetTailBytes()
	switch {
	case tail < 0:
		return nil, errdefs.Invalid("tail_bytes %d is negative", tail)
	case tail == 0:
		tail = defaultConsoleTail
	case tail > maxConsoleTail:
		return nil, errdefs.Invalid("tail_bytes %d is more than the %d bytes one call returns", tail, maxConsoleTail)
	}
	vm, err := v.s.lookupVM(ctx, project, req.GetName())
	if err != nil {
		return nil, err
	}
	hostName := vm.GetStatus().GetHost()
	if hostName == "" {
		return nil, errdefs.FailedPrecondition("vm %s is not on a host yet (phase %s): there is no console", vm.Meta.Name, vm.GetStatus().GetPhase())
	}
	host, err := v.s.getHost(ctx, hostName)
	if err != nil {
		return nil, err
	}
	// Every agent joined the cluster and serves mTLS with its host
	// certificate; the API presents its control-plane certificate.
	if v.s.agentTLS == nil {
		return nil, errdefs.FailedPrecondition("this API server has no control-plane certificate (Config.AgentTLS): it cannot call agents")
	}
	creds := credentials.NewTLS(v.s.agentCredentials(hostName))
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, v.s.agentOpt...)
	conn, err := grpc.NewClient(host.GetAddress(), opts...)
	if err != nil {
		return nil, errdefs.Unavailable("host %s at %s: %v", hostName, host.GetAddress(), err)
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, agentCallTimeout)
	defer cancel()
	resp, err := minicloudv1.NewAgentServiceClient(conn).GetConsoleLog(cctx, &minicloudv1.AgentConsoleLogRequest{VmId: vm.Meta.Id, TailBytes: tail})
	if err != nil {
		switch status.Code(err) {
		case codes.Unavailable, codes.DeadlineExceeded, codes.Unimplemented:
			return nil, errdefs.Unavailable("host %s (agent at %s, state %s) cannot be reached for the console of vm %s: %v",
				hostName, host.GetAddress(), host.GetState(), vm.Meta.Name, status.Convert(err).Message())
		}
		return nil, errdefs.FromGRPC(err)
	}
	return resp, nil
}
