package linux

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
)

// The whole ruleset lives in two tables of minicloud's own, so nothing here
// ever touches another program's rules:
//
//	table bridge minicloud: layer-2 anti-spoofing of frames entering a
//	  minicloud bridge from one of its ports (taps or adopted veths);
//	table inet minicloud: host protection (what guests may reach on the host),
//	  no routing between guest networks, and egress masquerade.
//
// Static rules never mention a port or a bridge: per-port and per-bridge data
// lives in sets keyed by interface name, so adding a VM is one set-element
// transaction and the rule list stays constant in size.
const tableName = "minicloud"

// ruleGeneration tags every static rule's comment. Bump it when a static rule
// changes: a Manager that finds rules of another generation replaces the
// chain's rules in one transaction (never a gap without filtering).
const ruleGeneration = "mc2"

var (
	bridgeTable = &nftables.Table{Family: nftables.TableFamilyBridge, Name: tableName}
	inetTable   = &nftables.Table{Family: nftables.TableFamilyINet, Name: tableName}
)

// Set names.
const (
	setBridges  = "bridges"      // inet: ifname of every minicloud bridge
	setPortMAC  = "port_mac"     // bridge: ifname . ether_addr — a port and its guest MAC
	setPortIP4  = "port_ip4"     // bridge: ifname . ipv4_addr — a port and its guest IP
	setReserved = "reserved_ip4" // bridge: gateways and 169.254.169.254, never a guest source
	setBridgeGW = "bridge_gw"    // inet: ifname . ipv4_addr — a bridge and its gateway
	setSameNet  = "same_net"     // inet: ifname . ifname — (bridge, bridge) for every bridge
	// setTunnelSrc is the tunnel ingress allowlist: the MAC and IP of every
	// remote port reachable through a tunnel.
	setTunnelSrc = "tunnel_src" // bridge: ifname . ether_addr . ipv4_addr
	// setTunnelLocal and setVTEPPair admit VXLAN to this host's tunnel
	// addresses only from the hosts (VTEPs) of known remote ports.
	setTunnelLocal = "tunnel_local" // inet: ipv4_addr — every tunnel's local address
	setVTEPPair    = "vtep_pair"    // inet: ipv4_addr . ipv4_addr — local . remote VTEP
	// setPortFwd maps a forwarded host port to its guest (port_forward.go);
	// each element's comment is the VM id.
	setPortFwd = "port_fwd" // inet map: inet_proto . inet_service : ipv4_addr . inet_service
)

// Chain names.
const (
	chainPrerouting  = "prerouting"
	chainPortEgress  = "port_egress"
	chainPortARP     = "port_arp"
	chainPortIP4     = "port_ip4"
	chainInput       = "input"
	chainGuestInput  = "guest_input"
	chainForward     = "forward"
	chainPostrouting = "postrouting"
	// Port forwards: DNAT of traffic to the host (fwd_prerouting) and of
	// the host's own connections to its addresses (fwd_output).
	chainFwdPrerouting = "fwd_prerouting"
	chainFwdOutput     = "fwd_output"
	// Tunnel chains (bridge table). The base chains' names differ from the
	// inet table's: staticRules is keyed by chain name.
	chainTunnelIngress = "tunnel_ingress"
	chainTunnelEgress  = "tunnel_egress"
	chainTunnelInput   = "tunnel_input"
	chainTunnelForward = "tunnel_forward"
	chainTunnelOutput  = "tunnel_output"
)

func newSets() map[*nftables.Table][]*nftables.Set {
	ifname := nftables.TypeIFName
	return map[*nftables.Table][]*nftables.Set{
		bridgeTable: {
			{Table: bridgeTable, Name: setPortMAC, KeyType: nftables.MustConcatSetType(ifname, nftables.TypeEtherAddr), Concatenation: true},
			{Table: bridgeTable, Name: setPortIP4, KeyType: nftables.MustConcatSetType(ifname, nftables.TypeIPAddr), Concatenation: true},
			{Table: bridgeTable, Name: setReserved, KeyType: nftables.TypeIPAddr, KeyByteOrder: binaryutil.BigEndian},
			{Table: bridgeTable, Name: setTunnelSrc, KeyType: nftables.MustConcatSetType(ifname, nftables.TypeEtherAddr, nftables.TypeIPAddr), Concatenation: true},
		},
		inetTable: {
			{Table: inetTable, Name: setBridges, KeyType: ifname, KeyByteOrder: binaryutil.NativeEndian},
			{Table: inetTable, Name: setBridgeGW, KeyType: nftables.MustConcatSetType(ifname, nftables.TypeIPAddr), Concatenation: true},
			{Table: inetTable, Name: setSameNet, KeyType: nftables.MustConcatSetType(ifname, ifname), Concatenation: true},
			{Table: inetTable, Name: setTunnelLocal, KeyType: nftables.TypeIPAddr, KeyByteOrder: binaryutil.BigEndian},
			{Table: inetTable, Name: setVTEPPair, KeyType: nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeIPAddr), Concatenation: true},
			{Table: inetTable, Name: setPortFwd, IsMap: true, Concatenation: true,
				KeyType:  nftables.MustConcatSetType(nftables.TypeInetProto, nftables.TypeInetService),
				DataType: nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)},
		},
	}
}

func policy(p nftables.ChainPolicy) *nftables.ChainPolicy { return &p }

func newChains() []*nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return []*nftables.Chain{
		{Table: bridgeTable, Name: chainPrerouting, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting,
			Priority: nftables.ChainPriorityRef(-200), Policy: policy(accept)},
		{Table: bridgeTable, Name: chainPortEgress},
		{Table: bridgeTable, Name: chainPortARP},
		{Table: bridgeTable, Name: chainPortIP4},
		{Table: bridgeTable, Name: chainTunnelIngress},
		{Table: bridgeTable, Name: chainTunnelEgress},
		{Table: bridgeTable, Name: chainTunnelInput, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput,
			Priority: nftables.ChainPriorityRef(-200), Policy: policy(accept)},
		{Table: bridgeTable, Name: chainTunnelForward, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward,
			Priority: nftables.ChainPriorityRef(-200), Policy: policy(accept)},
		{Table: bridgeTable, Name: chainTunnelOutput, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookOutput,
			Priority: nftables.ChainPriorityRef(-200), Policy: policy(accept)},
		{Table: inetTable, Name: chainInput, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput,
			Priority: nftables.ChainPriorityFilter, Policy: policy(accept)},
		{Table: inetTable, Name: chainGuestInput},
		{Table: inetTable, Name: chainForward, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward,
			Priority: nftables.ChainPriorityFilter, Policy: policy(accept)},
		{Table: inetTable, Name: chainPostrouting, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting,
			Priority: nftables.ChainPriorityNATSource, Policy: policy(accept)},
		{Table: inetTable, Name: chainFwdPrerouting, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPrerouting,
			Priority: nftables.ChainPriorityNATDest, Policy: policy(accept)},
		{Table: inetTable, Name: chainFwdOutput, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookOutput,
			Priority: nftables.ChainPriorityNATDest, Policy: policy(accept)},
	}
}

// staticRule is one rule of the fixed ruleset; comment identifies it.
type staticRule struct {
	comment string
	exprs   []expr.Any
}

// staticRules returns the fixed rules of every chain except postrouting,
// whose per-network masquerade rules are managed by EnsureBridge. sets gives
// the Set objects (name and transaction id) the lookups refer to.
func staticRules(sets map[*nftables.Table][]*nftables.Set, protected []netip.Prefix) map[string][]staticRule {
	bset := func(name string) *nftables.Set { return findSet(sets[bridgeTable], name) }
	iset := func(name string) *nftables.Set { return findSet(sets[inetTable], name) }
	return map[string][]staticRule{
		chainPrerouting: {
			// Ports are recognised by name (this kernel family has no
			// "meta ibrname"): every port name starts with network.PortPrefix,
			// which PortSpec.Validate enforces, so no port escapes the filter.
			{"frames from minicloud ports", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), cmp(expr.CmpOpEq, 1, []byte(network.PortPrefix)),
				jump(chainPortEgress))},
			{"frames from minicloud tunnels", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), cmp(expr.CmpOpEq, 1, []byte(TunnelPrefix)),
				jump(chainTunnelIngress))},
		},
		// The underlay is as hostile as a guest: a frame from a tunnel must
		// come from a remote port the API told this host about (MAC and IP),
		// never carries DHCP, and never reaches the host itself (gateway, DNS,
		// metadata), so nothing from the underlay can pass for a local port,
		// the gateway or 169.254.169.254.
		chainTunnelIngress: {
			{"ARP reply from a remote port (the VXLAN device's own proxy answer)", cat(
				etherType(unix.ETH_P_ARP),
				payload(expr.PayloadBaseNetworkHeader, 0, 8, 1), cmp(expr.CmpOpEq, 1, []byte{0, 1, 8, 0, 6, 4, 0, 2}),
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 8, 6, regConcat+4),
				payload(expr.PayloadBaseNetworkHeader, 14, 4, regConcat+6),
				lookup(regConcat, bset(setTunnelSrc), false), verdict(expr.VerdictAccept))},
			{"anything but IPv4 from a tunnel", cat(
				payload(expr.PayloadBaseLLHeader, 12, 2, 1), cmp(expr.CmpOpNeq, 1, binary.BigEndian.AppendUint16(nil, unix.ETH_P_IP)),
				counter(), verdict(expr.VerdictDrop))},
			{"IPv4 from a gateway or the metadata address over a tunnel", cat(
				payload(expr.PayloadBaseNetworkHeader, 12, 4, 1), lookup(1, bset(setReserved), false),
				counter(), verdict(expr.VerdictDrop))},
			{"IPv4 to a gateway or the metadata address over a tunnel", cat(
				payload(expr.PayloadBaseNetworkHeader, 16, 4, 1), lookup(1, bset(setReserved), false),
				counter(), verdict(expr.VerdictDrop))},
			{"DHCP server traffic over a tunnel", cat(
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 0, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				counter(), verdict(expr.VerdictDrop))},
			{"DHCP client traffic over a tunnel", cat(
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				counter(), verdict(expr.VerdictDrop))},
			{"IPv4 from a remote port", cat(
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseLLHeader, 6, 6, regConcat+4),
				payload(expr.PayloadBaseNetworkHeader, 12, 4, regConcat+6),
				lookup(regConcat, bset(setTunnelSrc), false), verdict(expr.VerdictAccept))},
			{"forged source from a tunnel", cat(counter(), verdict(expr.VerdictDrop))},
		},
		chainTunnelInput: {
			{"the host takes nothing from a tunnel (its gateway, DNS, DHCP and metadata are local)", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), cmp(expr.CmpOpEq, 1, []byte(TunnelPrefix)),
				counter(), verdict(expr.VerdictDrop))},
		},
		chainTunnelForward: {
			{"frames into a tunnel", cat(
				metaLoad(expr.MetaKeyOIFNAME, 1), cmp(expr.CmpOpEq, 1, []byte(TunnelPrefix)), jump(chainTunnelEgress))},
		},
		chainTunnelOutput: {
			{"host frames into a tunnel", cat(
				metaLoad(expr.MetaKeyOIFNAME, 1), cmp(expr.CmpOpEq, 1, []byte(TunnelPrefix)), jump(chainTunnelEgress))},
		},
		// What each host answers locally (gateway ARP, DHCP, DNS, metadata)
		// never crosses a tunnel: every host has the same gateway address
		// and bridge MAC (a distributed gateway).
		chainTunnelEgress: {
			// The VXLAN device (proxy on) answers ARP from its neighbour
			// table and never transmits ARP, so ARP must reach it.
			{"ARP (answered by the VXLAN device, never sent)", cat(etherType(unix.ETH_P_ARP), verdict(expr.VerdictAccept))},
			{"anything but IPv4 into a tunnel", cat(
				payload(expr.PayloadBaseLLHeader, 12, 2, 1), cmp(expr.CmpOpNeq, 1, binary.BigEndian.AppendUint16(nil, unix.ETH_P_IP)),
				counter(), verdict(expr.VerdictDrop))},
			{"IPv4 from a gateway or the metadata address into a tunnel", cat(
				payload(expr.PayloadBaseNetworkHeader, 12, 4, 1), lookup(1, bset(setReserved), false),
				counter(), verdict(expr.VerdictDrop))},
			{"DHCP server traffic into a tunnel", cat(
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 0, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				counter(), verdict(expr.VerdictDrop))},
			{"DHCP client traffic into a tunnel", cat(
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				counter(), verdict(expr.VerdictDrop))},
		},
		chainPortEgress: {
			{"unknown port or forged source MAC", cat(
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseLLHeader, 6, 6, regConcat+4),
				lookup(regConcat, bset(setPortMAC), true), counter(), verdict(expr.VerdictDrop))},
			{"ARP", cat(etherType(unix.ETH_P_ARP), jump(chainPortARP))},
			{"IPv4", cat(etherType(unix.ETH_P_IP), jump(chainPortIP4))},
			{"IPv6 and anything else: dropped (no IPv6 for guests yet)", cat(counter(), verdict(expr.VerdictDrop))},
		},
		chainPortARP: {
			{"ARP for IPv4 over Ethernet only", cat(
				payload(expr.PayloadBaseNetworkHeader, 0, 6, 1),
				cmp(expr.CmpOpNeq, 1, []byte{0, 1, 8, 0, 6, 4}), counter(), verdict(expr.VerdictDrop))},
			{"forged ARP sender MAC", cat(
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 8, 6, regConcat+4),
				lookup(regConcat, bset(setPortMAC), true), counter(), verdict(expr.VerdictDrop))},
			{"ARP claiming a gateway or the metadata address", cat(
				payload(expr.PayloadBaseNetworkHeader, 14, 4, 1), lookup(1, bset(setReserved), false),
				counter(), verdict(expr.VerdictDrop))},
			{"ARP probe (RFC 5227)", cat(
				payload(expr.PayloadBaseNetworkHeader, 14, 4, 1), cmp(expr.CmpOpEq, 1, []byte{0, 0, 0, 0}),
				verdict(expr.VerdictAccept))},
			{"ARP from the port's own IP", cat(
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 14, 4, regConcat+4),
				lookup(regConcat, bset(setPortIP4), false), verdict(expr.VerdictAccept))},
			{"forged ARP sender IP", cat(counter(), verdict(expr.VerdictDrop))},
		},
		chainPortIP4: {
			{"IPv4 from a gateway or the metadata address", cat(
				payload(expr.PayloadBaseNetworkHeader, 12, 4, 1), lookup(1, bset(setReserved), false),
				counter(), verdict(expr.VerdictDrop))},
			{"DHCP server reply from a guest", cat(
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 0, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				counter(), verdict(expr.VerdictDrop))},
			{"DHCP request with another client's chaddr", cat(
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseTransportHeader, 8+28, 6, regConcat+4),
				lookup(regConcat, bset(setPortMAC), true), counter(), verdict(expr.VerdictDrop))},
			{"DHCP discover/request before the guest has an address", cat(
				payload(expr.PayloadBaseNetworkHeader, 12, 8, 1), cmp(expr.CmpOpEq, 1, []byte{0, 0, 0, 0, 255, 255, 255, 255}),
				ipProto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 0, 4, 1), cmp(expr.CmpOpEq, 1, []byte{0, 68, 0, 67}),
				verdict(expr.VerdictAccept))},
			{"IPv4 from the port's own IP", cat(
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 12, 4, regConcat+4),
				lookup(regConcat, bset(setPortIP4), false), verdict(expr.VerdictAccept))},
			{"forged source IP", cat(counter(), verdict(expr.VerdictDrop))},
		},
		chainInput: {
			// Defence in depth on the underlay: VXLAN to a tunnel address
			// from anything but a known remote VTEP never reaches a tunnel
			// (other VXLAN users on the host, on other addresses, are untouched).
			{"VXLAN from an unknown VTEP", cat(nfproto(unix.NFPROTO_IPV4), l4proto(unix.IPPROTO_UDP),
				payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(VXLANPort)),
				payload(expr.PayloadBaseNetworkHeader, 16, 4, 1), lookup(1, iset(setTunnelLocal), false),
				payload(expr.PayloadBaseNetworkHeader, 16, 4, regConcat), payload(expr.PayloadBaseNetworkHeader, 12, 4, regConcat+1),
				lookup(regConcat, iset(setVTEPPair), true), counter(), verdict(expr.VerdictDrop))},
			{"traffic from guest networks to the host", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), lookup(1, iset(setBridges), false), jump(chainGuestInput))},
		},
		chainGuestInput: {
			{"replies to the host's own connections", cat(
				&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
					Xor:  binaryutil.NativeEndian.PutUint32(0)},
				cmp(expr.CmpOpNeq, 1, binaryutil.NativeEndian.PutUint32(0)), verdict(expr.VerdictAccept))},
			// DHCP only as a client sends it: broadcast (discover, request,
			// rebind) or unicast to its own bridge's gateway, the server
			// identifier (renew). Not to another bridge's gateway or any other
			// host address, where a DHCP server other than minicloud's (bound
			// to no device) could answer it.
			{"DHCP broadcast", cat(nfproto(unix.NFPROTO_IPV4), l4proto(unix.IPPROTO_UDP),
				payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				payload(expr.PayloadBaseNetworkHeader, 16, 4, 1), cmp(expr.CmpOpEq, 1, []byte{255, 255, 255, 255}),
				verdict(expr.VerdictAccept))},
			{"DHCP to the bridge's gateway", cat(nfproto(unix.NFPROTO_IPV4), l4proto(unix.IPPROTO_UDP),
				payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(67)),
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 16, 4, regConcat+4),
				lookup(regConcat, iset(setBridgeGW), false), verdict(expr.VerdictAccept))},
			{"DNS over UDP on the bridge's gateway", cat(nfproto(unix.NFPROTO_IPV4), l4proto(unix.IPPROTO_UDP),
				payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(53)),
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 16, 4, regConcat+4),
				lookup(regConcat, iset(setBridgeGW), false), verdict(expr.VerdictAccept))},
			{"DNS over TCP on the bridge's gateway", cat(nfproto(unix.NFPROTO_IPV4), l4proto(unix.IPPROTO_TCP),
				payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(53)),
				metaLoad(expr.MetaKeyIIFNAME, regConcat), payload(expr.PayloadBaseNetworkHeader, 16, 4, regConcat+4),
				lookup(regConcat, iset(setBridgeGW), false), verdict(expr.VerdictAccept))},
			{"metadata service", cat(nfproto(unix.NFPROTO_IPV4), l4proto(unix.IPPROTO_TCP),
				payload(expr.PayloadBaseNetworkHeader, 16, 4, 1), cmp(expr.CmpOpEq, 1, network.MetadataAddr.AsSlice()),
				payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(80)), verdict(expr.VerdictAccept))},
			{"anything else on the host", cat(counter(), verdict(expr.VerdictDrop))},
		},
		chainForward: append([]staticRule{
			// With br_netfilter (bridge-nf-call-iptables=1, common on hosts
			// running Docker or Kubernetes) frames bridged between two guests
			// of one network also pass this hook, with the bridge as both
			// input and output: they must go through.
			{"within one guest network", cat(
				metaLoad(expr.MetaKeyIIFNAME, regConcat), metaLoad(expr.MetaKeyOIFNAME, regConcat+4),
				lookup(regConcat, iset(setSameNet), false), verdict(expr.VerdictAccept))},
			// A guest that reached another host's VTEP could inject frames
			// into any network's segment: no guest sends VXLAN anywhere,
			// whatever --protected-nets says.
			{"guests may not send VXLAN", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), lookup(1, iset(setBridges), false), nfproto(unix.NFPROTO_IPV4),
				l4proto(unix.IPPROTO_UDP), payload(expr.PayloadBaseTransportHeader, 2, 2, 1), cmp(expr.CmpOpEq, 1, port(VXLANPort)),
				counter(), verdict(expr.VerdictDrop))},
			// A guest's answers on a forwarded connection (conntrack knows
			// it as the reply direction of a DNATed flow): they may go to
			// any client, a management network's too. Only replies: a
			// guest opens nothing new through this rule.
			{"replies of port forwards", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), lookup(1, iset(setBridges), false),
				&expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION}, cmp(expr.CmpOpEq, 1, []byte{ctDirReply}),
				&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(ctStatusDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
				cmp(expr.CmpOpNeq, 1, binaryutil.NativeEndian.PutUint32(0)), verdict(expr.VerdictAccept))},
			{"no routing between guest networks", cat(
				metaLoad(expr.MetaKeyIIFNAME, 1), lookup(1, iset(setBridges), false),
				metaLoad(expr.MetaKeyOIFNAME, 1), lookup(1, iset(setBridges), false),
				counter(), verdict(expr.VerdictDrop))},
		}, protectedRules(iset(setBridges), protected)...),
		// Traffic for one of the host's own addresses on a forwarded port,
		// from anywhere but a guest network (guests reach each other
		// directly; the host's ports are closed to them).
		chainFwdPrerouting: {
			{"port forwards", cat(nfproto(unix.NFPROTO_IPV4),
				metaLoad(expr.MetaKeyIIFNAME, 1), lookup(1, iset(setBridges), true),
				localDaddr(), forwardDNAT(iset(setPortFwd)))},
		},
		// The host's own connections to its own (non-loopback) addresses:
		// a packet from 127.0.0.1 could not be routed to a guest.
		chainFwdOutput: {
			{"port forwards from the host itself", cat(nfproto(unix.NFPROTO_IPV4),
				payload(expr.PayloadBaseNetworkHeader, 16, 1, 1), cmp(expr.CmpOpNeq, 1, []byte{127}),
				localDaddr(), forwardDNAT(iset(setPortFwd)))},
		},
	}
}

// ctDirReply is IP_CT_DIR_REPLY: a packet answering the connection's
// first one.
const ctDirReply = 1

// ctStatusDstNAT is IPS_DST_NAT: the connection's destination was NATed.
const ctStatusDstNAT = 1 << 5

// localDaddr matches packets to one of the host's own addresses (fib
// daddr type local).
func localDaddr() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		cmp(expr.CmpOpEq, 1, binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)),
	}
}

// forwardDNAT looks the packet's protocol and destination port up in the
// port_fwd map and rewrites its destination to the guest's address and
// port found there: meta l4proto . th dport → ip . port, as nft's
// "dnat ip to meta l4proto . th dport map @port_fwd" does.
func forwardDNAT(fwd *nftables.Set) []expr.Any {
	return []expr.Any{
		metaLoad(expr.MetaKeyL4PROTO, regConcat),
		payload(expr.PayloadBaseTransportHeader, 2, 2, regConcat+1),
		&expr.Lookup{SourceRegister: regConcat, DestRegister: regConcat, IsDestRegSet: true, SetName: fwd.Name, SetID: fwd.ID},
		counter(),
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: regConcat, RegProtoMin: regConcat + 1, Specified: true},
	}
}

// protectedRules keep guests from routing to the management networks (other
// hypervisors' agents, etcd, the API): the host's own ports are covered by
// guest_input, other hosts only by these.
func protectedRules(bridges *nftables.Set, nets []netip.Prefix) []staticRule {
	var out []staticRule
	for _, n := range nets {
		if !n.Addr().Is4() {
			continue // guests have no IPv6 at all
		}
		n = n.Masked()
		out = append(out, staticRule{"guests may not reach management network " + n.String(), cat(
			metaLoad(expr.MetaKeyIIFNAME, 1), lookup(1, bridges, false), nfproto(unix.NFPROTO_IPV4),
			payload(expr.PayloadBaseNetworkHeader, 16, 4, 1),
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: net.CIDRMask(n.Bits(), 32), Xor: []byte{0, 0, 0, 0}},
			cmp(expr.CmpOpEq, 1, n.Addr().AsSlice()), counter(), verdict(expr.VerdictDrop))})
	}
	return out
}

// masqueradeRule is the egress NAT of one network: traffic from its CIDR
// leaving through any interface other than its bridge.
func masqueradeRule(bridge string, cidr netip.Prefix) staticRule {
	mask := net.CIDRMask(cidr.Bits(), 32)
	return staticRule{
		comment: natComment(bridge, cidr),
		exprs: cat(nfproto(unix.NFPROTO_IPV4),
			payload(expr.PayloadBaseNetworkHeader, 12, 4, 1),
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
			cmp(expr.CmpOpEq, 1, cidr.Masked().Addr().AsSlice()),
			metaLoad(expr.MetaKeyOIFNAME, 1), cmp(expr.CmpOpNeq, 1, ifname(bridge)),
			counter(), &expr.Masq{}),
	}
}

func natComment(bridge string, cidr netip.Prefix) string {
	return "nat " + bridge + " " + cidr.Masked().String()
}

func (r staticRule) rule(c *nftables.Chain) *nftables.Rule {
	return &nftables.Rule{Table: c.Table, Chain: c, Exprs: r.exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, ruleGeneration+": "+r.comment)}
}

func ruleComment(r *nftables.Rule) string {
	s, _ := userdata.GetString(r.UserData, userdata.TypeComment)
	return s
}

// regConcat is NFT_REG32_00, the first 32-bit register: concatenated keys are
// loaded field after field from there (an ifname fills 4 registers).
const regConcat = 8

func cat(parts ...any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		switch v := p.(type) {
		case expr.Any:
			out = append(out, v)
		case []expr.Any:
			out = append(out, v...)
		}
	}
	return out
}

func metaLoad(key expr.MetaKey, reg uint32) expr.Any { return &expr.Meta{Key: key, Register: reg} }

func payload(base expr.PayloadBase, off, n, reg uint32) expr.Any {
	return &expr.Payload{OperationType: expr.PayloadLoad, Base: base, Offset: off, Len: n, DestRegister: reg}
}

func cmp(op expr.CmpOp, reg uint32, data []byte) expr.Any {
	return &expr.Cmp{Op: op, Register: reg, Data: data}
}

func lookup(reg uint32, s *nftables.Set, invert bool) expr.Any {
	return &expr.Lookup{SourceRegister: reg, SetName: s.Name, SetID: s.ID, Invert: invert}
}

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }
func jump(chain string) expr.Any          { return &expr.Verdict{Kind: expr.VerdictJump, Chain: chain} }
func counter() expr.Any                   { return &expr.Counter{} }

func etherType(t uint16) []expr.Any {
	return []expr.Any{payload(expr.PayloadBaseLLHeader, 12, 2, 1), cmp(expr.CmpOpEq, 1, binary.BigEndian.AppendUint16(nil, t))}
}

// ipProto matches the IPv4 protocol field (the bridge family has no
// meta l4proto for bridged frames).
func ipProto(p byte) []expr.Any {
	return []expr.Any{payload(expr.PayloadBaseNetworkHeader, 9, 1, 1), cmp(expr.CmpOpEq, 1, []byte{p})}
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{metaLoad(expr.MetaKeyNFPROTO, 1), cmp(expr.CmpOpEq, 1, []byte{p})}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{metaLoad(expr.MetaKeyL4PROTO, 1), cmp(expr.CmpOpEq, 1, []byte{p})}
}

func port(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }

// ifname is an interface name as nftables stores it: IFNAMSIZ bytes, NUL padded.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func ifnameFromKey(b []byte) string {
	if len(b) > unix.IFNAMSIZ {
		b = b[:unix.IFNAMSIZ]
	}
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// Set element keys. Concatenated fields are padded to 4-byte registers.
func keyPortMAC(tap string, mac net.HardwareAddr) []byte {
	k := ifname(tap)
	k = append(k, mac...)
	return append(k, 0, 0)
}

func keyIfIP(name string, ip netip.Addr) []byte { return append(ifname(name), ip.AsSlice()...) }

func keyTunnelSrc(tunnel string, mac net.HardwareAddr, ip netip.Addr) []byte {
	return append(keyPortMAC(tunnel, mac), ip.AsSlice()...)
}

func findSet(sets []*nftables.Set, name string) *nftables.Set {
	for _, s := range sets {
		if s.Name == name {
			return s
		}
	}
	panic("unknown set " + name)
}
