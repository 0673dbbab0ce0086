package linux

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Why a converged bridge or port is not read back on every call: the agent
// ensures every VM's bridge and port on every reconcile pass (each VM once
// a minute at rest), and verifying them read the ruleset through ~20
// netlink dumps, two of them the port sets, which hold every port of the
// host. That was most of a real pass's CPU and grew with the VMs
// (BenchmarkConvergedPass: 18 ms at 10 ports, 29 ms at 200, on a loaded
// host). The kernel counts every committed nftables transaction, whoever
// commits it (another agent, `nft`, firewalld), in the ruleset's
// generation: while it has not moved since a spec was found converged,
// nothing in the ruleset can differ from what was read then, and one
// NFT_MSG_GETGEN stands in for the dumps.

// memoMaxAge bounds how long a memo is trusted without reading the
// ruleset again. The generation is bumped in the same commit that changes
// the ruleset, but a read that falls between the bump and the new
// generation becoming visible to dumps could record the new number beside
// the old contents; re-verifying every few minutes bounds that window's
// cost, at a negligible price.
const memoMaxAge = 5 * time.Minute

// converged remembers, per bridge or port name, the spec whose rules were
// last found converged and the ruleset generation they were read at.
// Guarded by Manager.mu.
type converged map[string]convergedAt

type convergedAt struct {
	spec string
	gen  uint32
	at   time.Time
}

// current reports whether spec was found converged for name at generation
// gen, recently enough.
func (c converged) current(name, spec string, gen uint32, ok bool) bool {
	e, found := c[name]
	return ok && found && e.spec == spec && e.gen == gen && time.Since(e.at) < memoMaxAge
}

// memoBase is the memo of the tables, chains, sets and static rules.
const memoBase = "base"

// record notes spec converged for name as read at generation gen.
func (c converged) record(name, spec string, gen uint32) {
	c[name] = convergedAt{spec: spec, gen: gen, at: time.Now()}
}

// Why the Manager's own commits keep its memos: a create writes its port's
// filter, which moves the generation, so without this the next VM's bridge
// check (the nine others of ten creates at once, waiting on the bridge
// before their ports) read the whole ruleset again although nothing but
// this Manager had written it. A commit of this Manager whose generation
// is exactly one past the one read before its transaction's reads was the
// only commit in between: what was converged before it still is (each
// transaction changes only its own bridge's, port's or tunnel's elements,
// under m.mu, from what it has just read), and so is what it converged.

// followOwnCommit moves the memos from generation before, read before a
// transaction of this Manager (ok: it could be read), to the generation
// after its commit, when that commit was the only one in between;
// otherwise they stay behind and no longer match. Called with m.mu held.
func (m *Manager) followOwnCommit(before uint32, ok bool) {
	if !ok {
		return
	}
	after, err := rulesetGeneration()
	if err != nil || after != before+1 {
		return
	}
	for name, e := range m.memo {
		if e.gen == before {
			e.gen = after // at stays: memoMaxAge counts from the read
			m.memo[name] = e
		}
	}
}

// rulesetGeneration asks the kernel for the nftables ruleset's generation
// in the calling thread's network namespace. A plain blocking netlink
// socket: the answer is queued before sendto returns, and one round trip
// is the whole point (google/nftables' sockets, through mdlayher/socket,
// start a goroutine per message to watch its context).
func rulesetGeneration() (uint32, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return 0, fmt.Errorf("nftables generation: socket: %w", err)
	}
	defer unix.Close(fd)
	kernel := &unix.SockaddrNetlink{Family: unix.AF_NETLINK}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("nftables generation: bind: %w", err)
	}
	const seq = 1
	req := make([]byte, unix.NLMSG_HDRLEN+4) // nlmsghdr, nfgenmsg
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETGEN)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(req[8:], seq)
	req[unix.NLMSG_HDRLEN] = unix.AF_UNSPEC
	req[unix.NLMSG_HDRLEN+1] = unix.NFNETLINK_V0
	if err := unix.Sendto(fd, req, 0, kernel); err != nil {
		return 0, fmt.Errorf("nftables generation: send: %w", err)
	}
	buf := make([]byte, 512)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return 0, fmt.Errorf("nftables generation: receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return 0, fmt.Errorf("nftables generation: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
						return 0, fmt.Errorf("nftables generation: %w", syscall.Errno(-errno))
					}
				}
			case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWGEN:
				if gen, ok := genID(m.Data); ok {
					return gen, nil
				}
				return 0, fmt.Errorf("nftables generation: no NFTA_GEN_ID in the answer")
			}
		}
	}
}

// genID reads NFTA_GEN_ID from a NFT_MSG_NEWGEN's payload (nfgenmsg, then
// attributes).
func genID(b []byte) (uint32, bool) {
	if len(b) < 4 {
		return 0, false
	}
	b = b[4:]
	for len(b) >= unix.SizeofNlAttr {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < unix.SizeofNlAttr || l > len(b) {
			return 0, false
		}
		if typ == unix.NFTA_GEN_ID && l >= unix.SizeofNlAttr+4 {
			return binary.BigEndian.Uint32(b[unix.SizeofNlAttr:]), true
		}
		b = b[min((l+unix.NLA_ALIGNTO-1)&^(unix.NLA_ALIGNTO-1), len(b)):]
	}
	return 0, false
}
