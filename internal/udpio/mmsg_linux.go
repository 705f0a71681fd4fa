package udpio

import (
	"encoding/binary"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr for recvmmsg(2) and sendmmsg(2). Go pads it to
// the alignment of Msghdr, as C does: 64 bytes on 64-bit platforms, 32 on
// 32-bit ones.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
}

// Msgs is an array of datagrams, with their buffers and addresses, for
// recvmmsg. It is allocation-free after NewMsgs.
type Msgs struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
	bufs  [][]byte
	ctrl  []byte // with GRO or recvDst: a control buffer of groCtrlSpace bytes per message
}

// NewMsgs returns size messages with buffers of bufSize bytes.
func NewMsgs(size, bufSize int) *Msgs {
	return newMsgs(size, func(int) []byte { return make([]byte, bufSize) })
}

func newMsgs(size int, buf func(i int) []byte) *Msgs {
	m := &Msgs{
		hdrs:  make([]mmsghdr, size),
		iovs:  make([]unix.Iovec, size),
		names: make([]unix.RawSockaddrInet6, size),
		bufs:  make([][]byte, size),
	}
	for i := range size {
		m.bufs[i] = buf(i)
		m.iovs[i].Base = &m.bufs[i][0]
		m.iovs[i].SetLen(len(m.bufs[i]))
		m.hdrs[i].hdr.Name = (*byte)(unsafe.Pointer(&m.names[i]))
		m.hdrs[i].hdr.Iov = &m.iovs[i]
		m.hdrs[i].hdr.Iovlen = 1
	}
	return m
}

// UDP GRO: a message's buffer and its control buffer.
const (
	// groBuffer holds any UDP datagram, a coalesced one too: the kernel
	// coalesces up to 65535 bytes with the IP header.
	groBuffer = 1 << 16
	// groStride spaces the buffers so that their first bytes, which are
	// read first, do not all fall in the same cache sets.
	groStride = groBuffer + 7*64
)

// groCtrlSpace is the control buffer of a message with UDP GRO or the
// destination address: room for the UDP_GRO segment size and the other
// control messages a socket may have turned on, such as quic-go's IP_TOS
// or IPV6_TCLASS, IPV6_PKTINFO and, on an IPv6 socket, IP_PKTINFO too for
// an IPv4 datagram, and a timestamp, which the kernel writes before
// UDP_GRO: 176 bytes on 64-bit platforms, 132 on 32-bit ones.
var groCtrlSpace = 2*unix.CmsgSpace(4) + // UDP_GRO, IP_TOS or IPV6_TCLASS
	unix.CmsgSpace(unix.SizeofInet6Pktinfo) + // IPV6_PKTINFO
	unix.CmsgSpace(unix.SizeofInet4Pktinfo) + // IP_PKTINFO
	unix.CmsgSpace(16) + // SO_TIMESTAMP
	unix.CmsgSpace(4) // to spare

// newGROMsgs returns size messages for a socket with UDP GRO on, with
// buffers in mem, one anonymous mapping, whose pages the kernel backs only
// once a datagram reaches them, and out of the Go heap; the caller unmaps
// mem once the messages are no longer used.
func newGROMsgs(size int) (m *Msgs, mem []byte, err error) {
	mem, err = unix.Mmap(-1, 0, size*groStride, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, nil, err
	}
	m = newMsgs(size, func(i int) []byte { return mem[i*groStride : i*groStride+groBuffer : i*groStride+groBuffer] })
	m.withControl()
	return m, mem, nil
}

// withControl gives each message a control buffer of groCtrlSpace bytes.
func (m *Msgs) withControl() {
	m.ctrl = make([]byte, len(m.hdrs)*groCtrlSpace)
	for i := range m.hdrs {
		m.hdrs[i].hdr.Control = &m.ctrl[i*groCtrlSpace]
	}
}

// Len is the number of messages.
func (m *Msgs) Len() int { return len(m.hdrs) }

// Recv reads datagrams from fd without blocking into messages from on, and
// returns how many it read.
func (m *Msgs) Recv(fd uintptr, from int) (int, syscall.Errno) {
	for i := from; i < len(m.hdrs); i++ {
		m.hdrs[i].hdr.Namelen = unix.SizeofSockaddrInet6
		m.hdrs[i].hdr.Flags = 0
		if m.ctrl != nil {
			m.hdrs[i].hdr.SetControllen(groCtrlSpace)
		}
	}
	n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&m.hdrs[from])),
		uintptr(len(m.hdrs)-from), unix.MSG_DONTWAIT, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), 0
}

// Message returns datagram i: its source, its bytes (possibly none) and
// whether it was cut short.
func (m *Msgs) Message(i int) (netip.AddrPort, []byte, bool) {
	h := &m.hdrs[i]
	return addrPort(&m.names[i]), m.bufs[i][:h.len], h.hdr.Flags&unix.MSG_TRUNC != 0
}

// control returns the UDP GRO segment size of message i, the size of the
// datagrams that the kernel coalesced into it, or 0 when it holds one
// datagram as sent; and its destination address, or an invalid one when
// the socket does not report it (recvDst).
func (m *Msgs) control(i int) (segment int, dst netip.Addr) {
	if m.ctrl == nil {
		return 0, netip.Addr{}
	}
	return parseControl(m.ctrl[i*groCtrlSpace : i*groCtrlSpace+min(int(m.hdrs[i].hdr.Controllen), groCtrlSpace)])
}

// SendQueue gathers datagrams for one sendmmsg. It is allocation-free after
// NewSendQueue. The datagrams' bytes must stay put until they are sent.
type SendQueue struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
	srcs  []netip.Addr // AddFrom's sources, invalid for Add
	ctrl  []byte       // PktInfoSpace bytes per datagram, once AddFrom has a source
	n     int
}

// NewSendQueue returns a queue of up to size datagrams.
func NewSendQueue(size int) *SendQueue {
	q := &SendQueue{
		hdrs:  make([]mmsghdr, size),
		iovs:  make([]unix.Iovec, size),
		names: make([]unix.RawSockaddrInet6, size),
		srcs:  make([]netip.Addr, size),
	}
	for i := range q.hdrs {
		q.hdrs[i].hdr.Iov = &q.iovs[i]
		q.hdrs[i].hdr.Iovlen = 1
		q.hdrs[i].hdr.Name = (*byte)(unsafe.Pointer(&q.names[i]))
	}
	return q
}

// Len is the number of queued datagrams.
func (q *SendQueue) Len() int { return q.n }

// Add queues b, to be sent to to from a socket of the given family, or to
// the socket's connected peer if to is invalid. An empty b is a valid,
// empty datagram.
func (q *SendQueue) Add(b []byte, to netip.AddrPort, family int) {
	q.AddFrom(b, to, netip.Addr{}, family)
}

// AddFrom is Add with src, one of the host's addresses, as the datagram's
// source address (PutPktInfo): for a socket bound to an unspecified
// address. An invalid src leaves it to the kernel's route, as Add does.
func (q *SendQueue) AddFrom(b []byte, to netip.AddrPort, src netip.Addr, family int) {
	i := q.n
	h := &q.hdrs[i].hdr
	q.iovs[i].Base = unsafe.SliceData(b)
	q.iovs[i].SetLen(len(b))
	h.Namelen = putSockaddr(&q.names[i], family, to)
	q.srcs[i] = src
	if src.IsValid() {
		if q.ctrl == nil {
			q.ctrl = make([]byte, len(q.hdrs)*PktInfoSpace)
		}
		c := q.ctrl[i*PktInfoSpace : (i+1)*PktInfoSpace]
		h.Control = &c[0]
		h.SetControllen(PutPktInfo(c, src))
	} else if h.Control != nil {
		h.Control, h.Controllen = nil, 0
	}
	q.n++
}

// Unsource drops the sources of the queued datagrams from from up to to:
// they leave from the address the route picks, as Add's do. It returns the
// first source it dropped, invalid if none had one.
func (q *SendQueue) Unsource(from, to int) netip.Addr {
	var first netip.Addr
	for i := from; i < to; i++ {
		if !q.srcs[i].IsValid() {
			continue
		}
		if !first.IsValid() {
			first = q.srcs[i]
		}
		q.srcs[i] = netip.Addr{}
		h := &q.hdrs[i].hdr
		h.Control, h.Controllen = nil, 0
	}
	return first
}

// Send sends queued datagrams from up to to with one sendmmsg, without
// blocking, and returns how many the socket took.
func (q *SendQueue) Send(fd uintptr, from, to int) (int, syscall.Errno) {
	n, _, errno := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&q.hdrs[from])),
		uintptr(to-from), unix.MSG_DONTWAIT, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), 0
}

// SendGSO sends the queued datagrams from from up to to as one UDP GSO
// datagram (UDP_SEGMENT) to the first one's destination, from its source:
// every one of them but the last must be size bytes long, the last at most
// size.
func (q *SendQueue) SendGSO(fd uintptr, from, to, size int) syscall.Errno {
	// CMSG_SPACE(sizeof(uint16)), then the source's PKTINFO if any.
	var cmsg [unix.SizeofCmsghdr + 8 + unix.SizeofCmsghdr + unix.SizeofInet6Pktinfo + 4]byte
	h := (*unix.Cmsghdr)(unsafe.Pointer(&cmsg[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	*(*uint16)(unsafe.Pointer(&cmsg[unix.CmsgLen(0)])) = uint16(size)
	// CMSG_SPACE: where the buffer is longer (386), a 32-bit process's
	// padding would read as a second, malformed header: EINVAL.
	n := unix.CmsgSpace(2)
	if q.srcs[from].IsValid() {
		n += PutPktInfo(cmsg[n:], q.srcs[from])
	}
	msg := q.hdrs[from].hdr // its name
	msg.Iov = &q.iovs[from]
	msg.SetIovlen(to - from)
	msg.Control = &cmsg[0]
	msg.SetControllen(n)
	_, _, errno := unix.RawSyscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT)
	return errno
}

// GSORun is how many queued datagrams from from on, up to to, can leave
// as one UDP GSO datagram of segments of their first one's size: those with
// the same destination and source, of that size but the last, which may be shorter,
// at most 64 and 65507 bytes in all. It is 1 or more.
func (q *SendQueue) GSORun(from, to int) int {
	size, total := q.Size(from), q.Size(from)
	if size == 0 {
		return 1
	}
	n := 1
	for i := from + 1; i < to && n < maxSegments; i++ {
		s := q.Size(i)
		if s > size || s == 0 || total+s > maxGSOBytes || q.hdrs[i].hdr.Namelen != q.hdrs[from].hdr.Namelen ||
			q.names[i] != q.names[from] || q.srcs[i] != q.srcs[from] {
			break
		}
		n++
		total += s
		if s < size {
			break // the last
		}
	}
	return n
}

// NextRun returns what to send next of the queued datagrams from from up
// to to: those up to end, as one UDP GSO datagram of segment-byte segments,
// or, when segment is 0, with one sendmmsg (up to the next run that GSO
// can send, if gso allows it).
func (q *SendQueue) NextRun(from, to int, gso bool) (end, segment int) {
	if gso {
		if k := q.GSORun(from, to); k > 1 {
			return from + k, q.Size(from)
		}
	}
	end = from + 1
	for end < to && !(gso && q.GSORun(end, to) > 1) {
		end++
	}
	return end, 0
}

// Limits of one UDP GSO send.
const (
	maxSegments = 64 // UDP_MAX_SEGMENTS of older kernels
	maxGSOBytes = 65507
)

// Size is the length of queued datagram i.
func (q *SendQueue) Size(i int) int { return int(q.iovs[i].Len) }

// Reset empties the queue.
func (q *SendQueue) Reset() { q.n = 0 }

func addrPort(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return Unmap(netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port))
	}
	return netip.AddrPort{}
}

// putSockaddr stores ap in sa for a socket of the given family, and returns
// the address length; 0, no address, when ap is invalid: the send goes to
// the socket's connected peer, which skips the kernel's route lookup, or
// when an IPv4 socket cannot reach ap: the send then fails instead of
// reaching a wrong address.
func putSockaddr(sa *unix.RawSockaddrInet6, family int, ap netip.AddrPort) uint32 {
	*sa = unix.RawSockaddrInet6{} // no stale bytes: GSO runs compare whole addresses
	if !ap.IsValid() {
		return 0
	}
	if family == unix.AF_INET {
		if !ap.Addr().Is4() {
			return 0
		}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		sa4.Family = unix.AF_INET
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], ap.Port())
		sa4.Addr = ap.Addr().As4()
		return unix.SizeofSockaddrInet4
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ap.Addr().As16()}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
	return unix.SizeofSockaddrInet6
}
