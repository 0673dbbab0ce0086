package agent

import (
	"context"
	"errors"

	"github.com/minicloud/minicloud/agent/network"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/lifecycle"
)

// networkRefused makes a network the host refused to build visible: its
// CIDR overlaps one of the host's own routes (network.HostConflictError),
// and a bridge would divert the host's traffic for that range to the
// guests. The VM's NetworkReady condition says so and a warning event
// names the route; err is returned as is, so the create is retried and,
// still failing, given back to the scheduler — another host may not have
// that route.
func (a *Agent) networkRefused(ctx context.Context, vm *minicloudv1.VM, st *minicloudv1.VMStatus, err error) error {
	var hc *network.HostConflictError
	if !errors.As(err, &hc) {
		return err
	}
	a.log.Warn("network overlaps a route of this host: its bridge is not built", "vm", vm.GetMeta().GetId(), "cidr", hc.CIDR, "route", hc.Route, "via", hc.Via)
	setCondition(st, lifecycle.ConditionNetworkReady, false, lifecycle.ReasonNetworkOverlapsHost, hc.Error())
	if rerr := a.report(ctx, vm, st, reportStatus, warning(lifecycle.ReasonNetworkOverlapsHost, hc.Error())); rerr != nil {
		return errors.Join(err, rerr)
	}
	return err
}
