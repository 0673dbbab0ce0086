package netnstest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Raw frames let a test play a hostile guest: forge any source MAC or IP,
// answer DHCP, advertise an IPv6 router, poison ARP caches.

// Broadcast is the Ethernet broadcast address.
var Broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// SendFrames writes complete Ethernet frames out of the guest's eth0, in order.
func (g *Guest) SendFrames(frames ...[]byte) error {
	return g.Do(func() error {
		ifi, err := net.InterfaceByName(GuestIf)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}
		for _, f := range frames {
			if err := unix.Sendto(fd, f, 0, sa); err != nil {
				return fmt.Errorf("send frame: %w", err)
			}
		}
		return nil
	})
}

// Sniffer captures every frame arriving at one interface.
type Sniffer struct {
	f *os.File
}

// Sniff starts capturing frames received by the guest's eth0 (frames it sends
// itself are not captured).
func (g *Guest) Sniff() (*Sniffer, error) {
	var s *Sniffer
	err := g.Do(func() (err error) {
		s, err = sniff(GuestIf)
		return err
	})
	return s, err
}

// SniffHost captures frames received by a host interface, e.g. a bridge:
// what reaches the host's own stack from the guests.
func SniffHost(ifname string) (*Sniffer, error) { return sniff(ifname) }

func sniff(ifname string) (*Sniffer, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return nil, fmt.Errorf("packet socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ignore outgoing: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind to %s: %w", ifname, err)
	}
	return &Sniffer{f: os.NewFile(uintptr(fd), "sniff-"+ifname)}, nil
}

// Until returns the frames captured before the first one matching stop (stop
// excluded), or an error when ctx ends first. Tests send their forged frames
// first and a legitimate marker frame last over the same path: once the
// marker arrives, anything forged that got through has arrived too.
func (s *Sniffer) Until(ctx context.Context, stop func([]byte) bool) ([][]byte, error) {
	var seen [][]byte
	buf := make([]byte, 65536)
	for {
		dl, ok := ctx.Deadline()
		if !ok {
			dl = time.Now().Add(time.Minute)
		}
		_ = s.f.SetReadDeadline(dl)
		n, err := s.f.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return seen, fmt.Errorf("marker frame never arrived: %w", context.DeadlineExceeded)
			}
			return seen, err
		}
		f := append([]byte(nil), buf[:n]...)
		if stop(f) {
			return seen, nil
		}
		seen = append(seen, f)
	}
}

// Close stops the capture.
func (s *Sniffer) Close() error { return s.f.Close() }

// Ethernet builds an Ethernet II frame.
func Ethernet(dst, src net.HardwareAddr, etherType uint16, payload []byte) []byte {
	f := make([]byte, 0, 14+len(payload))
	f = append(f, dst...)
	f = append(f, src...)
	f = binary.BigEndian.AppendUint16(f, etherType)
	return append(f, payload...)
}

// UDP4 builds an Ethernet frame carrying an IPv4 UDP datagram.
func UDP4(dstMAC, srcMAC net.HardwareAddr, src, dst netip.AddrPort, payload []byte) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...) // checksum 0: none, valid for IPv4
	return Ethernet(dstMAC, srcMAC, unix.ETH_P_IP, ipv4(src.Addr(), dst.Addr(), unix.IPPROTO_UDP, udp))
}

func ipv4(src, dst netip.Addr, proto byte, payload []byte) []byte {
	h := make([]byte, 20, 20+len(payload))
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
	h[8] = 64
	h[9] = proto
	copy(h[12:], src.AsSlice())
	copy(h[16:], dst.AsSlice())
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return append(h, payload...)
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// ARP builds an ARP frame (op 1 request, 2 reply). A gratuitous ARP has
// senderIP == targetIP.
func ARP(dstMAC, srcMAC net.HardwareAddr, op uint16, senderMAC net.HardwareAddr, senderIP netip.Addr, targetMAC net.HardwareAddr, targetIP netip.Addr) []byte {
	p := []byte{0, 1, 8, 0, 6, 4}
	p = binary.BigEndian.AppendUint16(p, op)
	p = append(p, senderMAC...)
	p = append(p, senderIP.AsSlice()...)
	if targetMAC == nil {
		targetMAC = make(net.HardwareAddr, 6)
	}
	p = append(p, targetMAC...)
	p = append(p, targetIP.AsSlice()...)
	return Ethernet(dstMAC, srcMAC, unix.ETH_P_ARP, p)
}

// IPv6 builds an Ethernet frame carrying an IPv6 packet (no extension headers).
func IPv6(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, next byte, payload []byte) []byte {
	h := make([]byte, 40, 40+len(payload))
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(payload)))
	h[6] = next
	h[7] = 255
	copy(h[8:], src.AsSlice())
	copy(h[24:], dst.AsSlice())
	return Ethernet(dstMAC, srcMAC, unix.ETH_P_IPV6, append(h, payload...))
}

// RouterAdvertisement builds an ICMPv6 router advertisement (type 134) to
// all-nodes from the link-local address derived from src.
func RouterAdvertisement(src net.HardwareAddr) []byte {
	ll := linkLocal(src)
	all := netip.MustParseAddr("ff02::1")
	ra := []byte{134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(ra[2:], icmp6Checksum(ll, all, ra))
	return IPv6(net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, src, ll, all, 58, ra)
}

// DHCPv6Reply builds a DHCPv6 ADVERTISE (udp 547 -> 546) to all DHCP agents.
func DHCPv6Reply(src net.HardwareAddr) []byte {
	ll := linkLocal(src)
	dst := netip.MustParseAddr("ff02::1:2")
	udp := []byte{0x02, 0x23, 0x02, 0x22, 0, 12, 0, 0, 2, 0xaa, 0xbb, 0xcc}
	return IPv6(net.HardwareAddr{0x33, 0x33, 0, 1, 0, 2}, src, ll, dst, 17, udp)
}

func linkLocal(mac net.HardwareAddr) netip.Addr {
	var a [16]byte
	a[0], a[1] = 0xfe, 0x80
	a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15] = mac[0]^2, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]
	return netip.AddrFrom16(a)
}

func icmp6Checksum(src, dst netip.Addr, msg []byte) uint16 {
	ph := append(src.AsSlice(), dst.AsSlice()...)
	ph = binary.BigEndian.AppendUint32(ph, uint32(len(msg)))
	ph = append(ph, 0, 0, 0, 58)
	return checksum(append(ph, msg...))
}

// IsUDP4 reports whether frame is an IPv4 UDP datagram to dstPort whose
// payload is exactly payload.
func IsUDP4(frame []byte, dstPort uint16, payload []byte) bool {
	if len(frame) < 14+20+8 || binary.BigEndian.Uint16(frame[12:]) != unix.ETH_P_IP || frame[14+9] != unix.IPPROTO_UDP {
		return false
	}
	ihl := int(frame[14]&0x0f) * 4
	udp := frame[14+ihl:]
	if len(udp) < 8 || binary.BigEndian.Uint16(udp[2:]) != dstPort {
		return false
	}
	n := int(binary.BigEndian.Uint16(udp[4:]))
	return n >= 8 && n <= len(udp) && string(udp[8:n]) == string(payload)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
