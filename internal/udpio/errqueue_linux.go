package udpio

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// ICMPError is an ICMP error the kernel reported for a datagram sent from a
// socket, read from its error queue.
type ICMPError struct {
	Dest     netip.AddrPort // where the datagram that drew it was sent
	Offender netip.Addr     // who sent the ICMP error, if known
	Origin   uint8          // OriginICMP or OriginICMP6; others are local
	Type     uint8          // the ICMP type
	Code     uint8          // the ICMP code
}

// Origins of an ICMPError.
const (
	OriginICMP  = unix.SO_EE_ORIGIN_ICMP
	OriginICMP6 = unix.SO_EE_ORIGIN_ICMP6
)

// EnableICMPErrors makes the kernel report ICMP errors on conn, which is
// not connected: the read after one fails with its errno (ECONNREFUSED for a
// port unreachable), and the error queue tells which destination drew it.
func EnableICMPErrors(conn syscall.Conn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = setRecvErr(int(fd)) }); err != nil {
		return err
	}
	return serr
}

func setRecvErr(fd int) error {
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return fmt.Errorf("getting SO_DOMAIN: %w", err)
	}
	if domain == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1); err != nil {
			return fmt.Errorf("setting IPV6_RECVERR: %w", err)
		}
	}
	// On an IPv6 socket too: a dual-stack socket reaches IPv4 upstreams,
	// as IPv4-mapped addresses, through the IPv4 stack.
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_RECVERR, 1); err != nil {
		return fmt.Errorf("setting IP_RECVERR: %w", err)
	}
	return nil
}

// ReadErrQueue reads up to len(out) entries from conn's error queue without
// blocking, and returns how many it stored in out.
func ReadErrQueue(conn syscall.Conn, out []ICMPError) (int, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		n       int
		rerr    error
		payload [1]byte // the start of the datagram that drew the error: unused
		oob     [128]byte
	)
	err = rc.Read(func(fd uintptr) bool {
		for range len(out) {
			_, oobn, _, from, err := unix.Recvmsg(int(fd), payload[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if err != unix.EAGAIN {
					rerr = err
				}
				return true // done; never wait for more
			}
			if e, ok := parseErrQueueMsg(oob[:oobn], from); ok {
				out[n] = e
				n++
			}
		}
		return true
	})
	if err != nil {
		return n, err
	}
	return n, rerr
}

// sizeofSockExtendedErr is the size of struct sock_extended_err.
const sizeofSockExtendedErr = 16

// parseErrQueueMsg decodes one error queue message: its name is the
// destination of the datagram that drew the error, and its control message
// a struct sock_extended_err followed by the offender's address.
func parseErrQueueMsg(oob []byte, from unix.Sockaddr) (ICMPError, bool) {
	var e ICMPError
	switch sa := from.(type) {
	case *unix.SockaddrInet4:
		e.Dest = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		e.Dest = Unmap(netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)))
	default:
		return e, false
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return e, false
	}
	for _, m := range msgs {
		if !(m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_RECVERR ||
			m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_RECVERR) {
			continue
		}
		d := m.Data
		if len(d) < sizeofSockExtendedErr {
			continue
		}
		// struct sock_extended_err { u32 errno; u8 origin, type, code, pad;
		// u32 info, data; }, then SO_EE_OFFENDER: a sockaddr.
		e.Origin, e.Type, e.Code = d[4], d[5], d[6]
		off := d[sizeofSockExtendedErr:]
		if len(off) >= 8 && binary.NativeEndian.Uint16(off) == unix.AF_INET {
			e.Offender = netip.AddrFrom4([4]byte(off[4:8]))
		} else if len(off) >= 24 && binary.NativeEndian.Uint16(off) == unix.AF_INET6 {
			e.Offender = netip.AddrFrom16([16]byte(off[8:24])).Unmap()
		}
		return e, true
	}
	return e, false
}
