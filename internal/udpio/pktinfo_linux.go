package udpio

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A socket bound to an unspecified address (0.0.0.0, [::]) takes datagrams
// sent to any of the host's addresses, but a reply sent from it leaves from
// the address the kernel's route picks, not necessarily the one the client
// sent to: a connected client, a NAT or a firewall then drops it. As in
// nginx and quic-go, such a socket learns each datagram's destination
// address from an IP_PKTINFO or IPV6_PKTINFO control message, and a reply
// names it as its source in the same control message. A socket bound to
// one address needs neither.

// PktInfoSpace is the most a control message of PutPktInfo takes.
var PktInfoSpace = unix.CmsgSpace(unix.SizeofInet6Pktinfo)

// PutPktInfo writes into c, at least PktInfoSpace bytes, a control message
// that makes addr, unmapped, a datagram's source address on sendmsg:
// IP_PKTINFO (ipi_spec_dst) for IPv4, which IPv6 sockets also take for an
// IPv4 destination, IPV6_PKTINFO for IPv6. The message says addr is the
// destination too (ipi_addr), as a received one does. It returns the
// message's length, 0 for an invalid addr. The interface is left to the
// route (index 0).
func PutPktInfo(c []byte, addr netip.Addr) int {
	addr = addr.Unmap()
	h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
	switch {
	case addr.Is4():
		clear(c[:unix.CmsgSpace(unix.SizeofInet4Pktinfo)])
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
		info := (*unix.Inet4Pktinfo)(unsafe.Pointer(&c[unix.CmsgLen(0)]))
		info.Spec_dst, info.Addr = addr.As4(), addr.As4()
		return unix.CmsgSpace(unix.SizeofInet4Pktinfo)
	case addr.Is6():
		clear(c[:unix.CmsgSpace(unix.SizeofInet6Pktinfo)])
		h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
		info := (*unix.Inet6Pktinfo)(unsafe.Pointer(&c[unix.CmsgLen(0)]))
		info.Addr = addr.As16()
		return unix.CmsgSpace(unix.SizeofInet6Pktinfo)
	}
	return 0
}

// recvDst turns on the control messages of each datagram's destination
// address for conn if it is bound to an unspecified address, and reports
// whether it did. An IPv6 socket reports an IPv4 datagram's destination as
// an IPv4-mapped address in IPV6_PKTINFO, and, with IP_PKTINFO on too, the
// address to reply from in IP_PKTINFO (parseControl).
func recvDst(conn *net.UDPConn, rc syscall.RawConn) bool {
	if ua, ok := conn.LocalAddr().(*net.UDPAddr); !ok || !ua.IP.IsUnspecified() {
		return false
	}
	family := Family(rc)
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		if family != unix.AF_INET {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		}
	}); err != nil {
		return false
	}
	return serr == nil
}

// parseControl walks c, the control messages of one received datagram,
// and returns the UDP GRO segment size (0 if none) and the destination
// address, unmapped (invalid if none), that a reply must leave from: of
// IP_PKTINFO, the address the kernel names for replies (ipi_spec_dst),
// which is the header's destination sent to one of the host's addresses,
// and the interface's address for one sent to a broadcast or multicast
// address, which is no source; else the header's destination of
// IPV6_PKTINFO, unless multicast or link-local (a source of which needs
// its interface: with index 0 a send fails). It stops at a malformed
// message.
func parseControl(c []byte) (segment int, dst netip.Addr) {
	var v6 netip.Addr
	for len(c) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
		n := int(h.Len)
		if n < unix.CmsgLen(0) || n > len(c) {
			break // malformed or cut short
		}
		data := c[unix.CmsgLen(0):n]
		switch {
		case h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && len(data) >= 4:
			segment = int(*(*int32)(unsafe.Pointer(&data[0])))
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			dst = netip.AddrFrom4((*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0])).Spec_dst)
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			v6 = netip.AddrFrom16((*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0])).Addr).Unmap()
		}
		next := unix.CmsgSpace(n - unix.CmsgLen(0)) // n, aligned
		if next >= len(c) {
			break
		}
		c = c[next:]
	}
	if !dst.IsValid() && !v6.IsMulticast() && !(v6.Is6() && v6.IsLinkLocalUnicast()) {
		dst = v6
	}
	return segment, dst
}

// WriteFrom sends b to to out of conn from src, one of the host's
// addresses (PutPktInfo), or from the address the route picks if src is
// invalid. If the send fails because src is no longer the host's
// (SourceGone), it sends b again from the route's address and returns the
// first error as gone.
func WriteFrom(conn *net.UDPConn, b []byte, to netip.AddrPort, src netip.Addr) (n int, gone, err error) {
	if !src.IsValid() {
		n, err = conn.WriteToUDPAddrPort(b, to)
		return n, nil, err
	}
	var oob [unix.SizeofCmsghdr + unix.SizeofInet6Pktinfo + 4]byte // PktInfoSpace
	n, _, err = conn.WriteMsgUDPAddrPort(b, oob[:PutPktInfo(oob[:], src)], to)
	if err != nil && SourceGone(err) {
		gone = err
		n, err = conn.WriteToUDPAddrPort(b, to)
	}
	return n, gone, err
}

// SourceGone reports whether err, of a send from a source address
// (PutPktInfo), says that the address is no longer one of the host's (it
// was removed, or a virtual address moved to another host): ENETUNREACH or
// EADDRNOTAVAIL for IPv4, EINVAL for IPv6. The send may then go again from
// the route's address, where replies left from before sources were named.
func SourceGone(err error) bool {
	return errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EADDRNOTAVAIL)
}
