package network

import (
	"fmt"
	"net/netip"
)

// HostConflictError is EnsureBridge refusing to build a network's bridge
// because its CIDR overlaps a route of the host (or a network the host
// protects): the bridge's connected route would take the host's own
// traffic for that range to the guests — its way to the API, to etcd or to
// the other hosts. Nothing is changed on the host; the VM's reconcile
// reports it as a condition and an event.
type HostConflictError struct {
	// CIDR is the network's.
	CIDR netip.Prefix
	// Route is what it overlaps: a route's destination, or a protected net.
	Route netip.Prefix
	// Via says where Route leads: "dev eth0", "--protected-nets".
	Via string
}

func (e *HostConflictError) Error() string {
	return fmt.Sprintf("network %s overlaps this host's route to %s (%s): its bridge would divert the host's own traffic, so it is not built here; use a disjoint range (and reserve the host's ranges with minicloudd api --reserved-cidr)", e.CIDR, e.Route, e.Via)
}
