package server

import (
	"context"
	"time"

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
	a, err := v.s.dialVMAgent(ctx, project, req.GetName(), false)
	if err != nil {
		return nil, err
	}
	defer a.Close()
	cctx, cancel := context.WithTimeout(ctx, agentCallTimeout)
	defer cancel()
	resp, err := a.client.GetConsoleLog(cctx, &minicloudv1.AgentConsoleLogRequest{VmId: a.vm.Meta.Id, TailBytes: tail})
	if err != nil {
		return nil, a.agentError("console", err)
	}
	return resp, nil
}
