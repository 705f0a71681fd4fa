package stabilize

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// On Linux quicConn is an OOBCapablePacketConn with ReadBatch, so quic-go
// takes its fast path: batched reads (from the queue, never from the
// socket, which caddy-l4 or fastudp reads), GSO and ECN on writes, and
// path-MTU discovery, since the sockets writes go out of have DF set.

// quicSocketOptions gives a socket that writes go out of what quic-go
// sets on its own sockets through SyscallConn and relies on:
//   - Don't Fragment (path-MTU "probe" mode), so that a path-MTU probe too
//     big for the path is lost rather than fragmented. The socket is the
//     listener's, shared with every route on it: their datagrams leave
//     with DF too, so one larger than the interface's MTU fails (EMSGSIZE)
//     and one larger than the path's is dropped on the way, where both
//     used to leave as IP fragments.
//   - receive and send buffers of at least quicSocketBuffer.
//
// The read options quic-go also sets (IP_RECVTOS, IP_PKTINFO) change
// nothing for caddy-l4's reader, which takes no control messages, and add
// control messages next to UDP_GRO for fastudp's readers, whose control
// buffers have room for them and which look for UDP_GRO among them. A UDP
// socket takes these options: only a closed one fails.
func quicSocketOptions(rc syscall.RawConn) error {
	return rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_PROBE)
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_PROBE)
		for _, opt := range [][2]int{{unix.SO_RCVBUF, unix.SO_RCVBUFFORCE}, {unix.SO_SNDBUF, unix.SO_SNDBUFFORCE}} {
			// The kernel reports twice the size it was given.
			if size, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0]); err == nil && size < 2*quicSocketBuffer {
				if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], quicSocketBuffer) != nil {
					_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], quicSocketBuffer)
				}
			}
		}
	})
}

// quicSocketBuffer is the socket buffer size quic-go asks for.
const quicSocketBuffer = 7 << 20

// SyscallConn is the socket that writes go out of now, for the options
// quic-go sets (DF, buffers, ECN) and to find out whether it has GSO.
// setOut gives every later one DF and the buffers (quicSocketOptions).
func (c *quicConn) SyscallConn() (syscall.RawConn, error) {
	return c.out.Load().rc, nil
}

// ReadBatch fills ms with client datagrams, as a batchConn of quic-go: it
// waits for the first as ReadFrom does, then takes those already queued.
// A datagram's destination address, where the listener's is unspecified,
// comes as IP_PKTINFO or IPV6_PKTINFO in its OOB, as on quic-go's own
// socket.
func (c *quicConn) ReadBatch(ms []ipv4.Message, _ int) (int, error) {
	p, err := c.next()
	if err != nil {
		return 0, err
	}
	n := 0
	for {
		m := &ms[n]
		m.N = copy(m.Buffers[0], p.buf[:p.n])
		m.NN, m.Flags = 0, 0
		if p.dst.IsValid() && len(m.OOB) >= udpio.PktInfoSpace {
			// quic-go reads it as the socket's own, and names the address
			// as the source of its packets to the client (packetInfo).
			m.NN = udpio.PutPktInfo(m.OOB, p.dst)
		}
		m.Addr = c.addrOf(p.from)
		quicPacketPool.Put(p)
		if n++; n == len(ms) {
			return n, nil
		}
		select {
		case p = <-c.in:
		default:
			return n, nil
		}
	}
}

// addrOf is from as a net.Addr, the same one for a client's datagrams in a
// row: allocation-free for a busy client. quic-go never changes it.
func (c *quicConn) addrOf(from netip.AddrPort) net.Addr {
	if c.addr == nil || c.fromAddr != from {
		c.fromAddr, c.addr = from, net.UDPAddrFromAddrPort(from)
	}
	return c.addr
}

// ReadMsgUDP is ReadFrom, with no control messages.
func (c *quicConn) ReadMsgUDP(b, _ []byte) (n, oobn, flags int, addr *net.UDPAddr, err error) {
	n, a, err := c.ReadFrom(b)
	if err != nil {
		return 0, 0, 0, nil, err
	}
	return n, 0, 0, a.(*net.UDPAddr), nil
}

// WriteMsgUDP sends b with its control messages (quic-go's GSO segment
// size, ECN, source address) to addr out of the listener's socket, without
// waiting: the socket is shared, and a write that waited would hold its
// other writers. As in WriteTo, a lost datagram is counted, not an error,
// except the two errors quic-go handles: EMSGSIZE (a path-MTU probe too
// big) and EIO (no GSO on the device: it sends the segments one by one).
func (c *quicConn) WriteMsgUDP(b, oob []byte, addr *net.UDPAddr) (n, oobn int, err error) {
	ap := addr.AddrPort()
	to := netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	out := c.out.Load()
	err = sendMsg(out, b, oob, to)
	if errors.Is(err, net.ErrClosed) {
		if out = c.takeOver(out.conn); out != nil {
			err = sendMsg(out, b, oob, to)
		}
	}
	switch {
	case err == nil:
	case errors.Is(err, unix.EMSGSIZE):
		return 0, 0, os.NewSyscallError("sendmsg", err)
	case (errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL)) && hasGSO(oob):
		// EIO: no GSO on the device, quic-go sends the segments one by
		// one; EINVAL: a segment over the MTU, as on quic-go's own socket.
		return 0, 0, os.NewSyscallError("sendmsg", err)
	default:
		c.writeErrors.Add(1)
	}
	return len(b), len(oob), nil
}

// hasGSO reports whether oob holds a UDP_SEGMENT control message: quic-go
// takes EIO for a GSO failure, and would resend a datagram sent without
// GSO as zero-length segments.
func hasGSO(oob []byte) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_UDP && m.Header.Type == unix.UDP_SEGMENT {
			return true
		}
	}
	return false
}

// quicSend is one sendmsg call's state, pooled so that writes from many
// connections at once allocate nothing.
type quicSend struct {
	b, oob []byte
	to     unix.Sockaddr
	sa4    unix.SockaddrInet4
	sa6    unix.SockaddrInet6
	err    error
	sendf  func(fd uintptr) bool // send, bound once
}

var quicSendPool = sync.Pool{New: func() any {
	s := new(quicSend)
	s.sendf = s.send
	return s
}}

// sendMsg sends b and oob to to out of sock without blocking: nil, the
// socket's error (a syscall.Errno), or net.ErrClosed.
func sendMsg(sock *quicSocket, b, oob []byte, to netip.AddrPort) error {
	s := quicSendPool.Get().(*quicSend)
	defer quicSendPool.Put(s)
	switch {
	case sock.family != unix.AF_INET:
		s.sa6.Addr, s.sa6.Port, s.sa6.ZoneId = to.Addr().As16(), int(to.Port()), zoneID(to.Addr().Zone())
		s.to = &s.sa6
	case to.Addr().Is4():
		s.sa4.Addr, s.sa4.Port = to.Addr().As4(), int(to.Port())
		s.to = &s.sa4
	default:
		return unix.EAFNOSUPPORT
	}
	s.b, s.oob, s.err = b, oob, nil
	err := sock.rc.Write(s.sendf)
	s.b, s.oob = nil, nil // keep no caller's buffer
	if err != nil {
		return err // net.ErrClosed
	}
	return s.err
}

// zoneID is the interface index of an IPv6 link-local address's zone, or
// 0 without one. It is looked up once a zoneTTL, not for every write: the
// lookup asks the kernel for every interface and allocates.
func zoneID(zone string) uint32 {
	if zone == "" {
		return 0
	}
	now := time.Now().UnixNano()
	zones.RLock()
	z, ok := zones.m[zone]
	zones.RUnlock()
	if ok && now-z.at < int64(zoneTTL) {
		return z.index
	}
	z = zoneIndex{index: lookupZone(zone), at: now}
	zones.Lock()
	zones.m[zone] = z // one per interface name or index
	zones.Unlock()
	return z.index
}

// lookupZone asks the kernel for the interface index of zone, a name or a
// number.
func lookupZone(zone string) uint32 {
	if ifi, err := net.InterfaceByName(zone); err == nil {
		return uint32(ifi.Index)
	}
	n, _ := strconv.ParseUint(zone, 10, 32)
	return uint32(n)
}

// zones caches zoneID's lookups, by zone.
var zones = struct {
	sync.RWMutex
	m map[string]zoneIndex
}{m: make(map[string]zoneIndex)}

// zoneIndex is an interface index and when it was looked up, in Unix
// nanoseconds.
type zoneIndex struct {
	index uint32
	at    int64
}

// zoneTTL is how long a zone's index is trusted: an interface that is
// removed and added again gets another index. Go's net package caches its
// own for as long.
const zoneTTL = time.Minute

func (s *quicSend) send(fd uintptr) bool {
	_, s.err = unix.SendmsgN(int(fd), s.b, s.oob, s.to, unix.MSG_DONTWAIT)
	return true // never wait for the socket
}

// Interface guards
var (
	_ quic.OOBCapablePacketConn = (*quicConn)(nil)
	_ interface {
		ReadBatch([]ipv4.Message, int) (int, error)
	} = (*quicConn)(nil)
)
