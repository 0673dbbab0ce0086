package dhcpserver

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// l2Sender sends replies to a client that has no address yet straight to its
// MAC, as RFC 2131 §4.1 prefers over broadcast: neighbours on the bridge
// never see another guest's offer (its address, hostname), and the source
// address is set explicitly to the gateway.
type l2Sender struct {
	fd      int
	ifindex int
}

func newL2Sender(ifindex int) (*l2Sender, error) {
	// SOCK_DGRAM: the kernel writes the Ethernet header (source: the bridge).
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("packet socket: %w", err)
	}
	return &l2Sender{fd: fd, ifindex: ifindex}, nil
}

func (s *l2Sender) close() error { return unix.Close(s.fd) }

// send wraps payload in UDP 67->68 and IPv4 src->dst and sends it to mac.
func (s *l2Sender) send(mac net.HardwareAddr, src, dst netip.Addr, payload []byte) error {
	pkt := udp4(src, dst, 67, 68, payload)
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: s.ifindex, Halen: 6}
	copy(sa.Addr[:], mac)
	if err := unix.Sendto(s.fd, pkt, 0, sa); err != nil {
		return fmt.Errorf("send to %s: %w", mac, err)
	}
	return nil
}

func udp4(src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	ulen := 8 + len(payload)
	b := make([]byte, 20+ulen)
	ip := b[:20]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(len(b)))
	ip[8] = 64
	ip[9] = unix.IPPROTO_UDP
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	binary.BigEndian.PutUint16(ip[10:], ^sum(ip, 0))
	u := b[20:]
	binary.BigEndian.PutUint16(u[0:], sport)
	binary.BigEndian.PutUint16(u[2:], dport)
	binary.BigEndian.PutUint16(u[4:], uint16(ulen))
	copy(u[8:], payload)
	pseudo := make([]byte, 0, 12)
	pseudo = append(pseudo, s4[:]...)
	pseudo = append(pseudo, d4[:]...)
	pseudo = append(pseudo, 0, unix.IPPROTO_UDP)
	pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(ulen))
	c := ^sum(u, sum(pseudo, 0))
	if c == 0 {
		c = 0xffff // 0 means "no checksum" in UDP over IPv4
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return b
}

// sum is the ones' complement sum used by IPv4 and UDP checksums.
func sum(b []byte, acc uint16) uint16 {
	s := uint32(acc)
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
