package metadata

import (
	"net"
	"sync"
)

// peerListener tags accepted connections with the resolver that identifies
// them.
type peerListener struct {
	net.Listener
	resolver PeerResolver
}

func (l *peerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &peerConn{Conn: c, resolver: l.resolver}, nil
}

// peerConn resolves its peer once per connection: the bridge and the
// source address cannot change within one TCP connection, and anti-spoofing
// filters keep the source MAC honest.
type peerConn struct {
	net.Conn
	resolver PeerResolver
	once     sync.Once
	peer     Peer
	err      error

	macOnce sync.Once
	mac     net.HardwareAddr
	macErr  error
}

func (c *peerConn) resolve() (Peer, error) {
	c.once.Do(func() { c.peer, c.err = c.resolver.ResolvePeer(c.Conn) })
	return c.peer, c.err
}

// sourceMAC is the peer's MAC, looked up at most once per connection.
func (c *peerConn) sourceMAC() (net.HardwareAddr, error) {
	c.macOnce.Do(func() {
		c.mac = c.peer.MAC
		if mr, ok := c.resolver.(macResolver); ok && c.mac == nil {
			c.mac, c.macErr = mr.resolveMAC(c.peer)
		}
	})
	return c.mac, c.macErr
}

type peerConnKey struct{}
