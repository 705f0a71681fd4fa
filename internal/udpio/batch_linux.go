package udpio

import (
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// Batch reads up to a batch of datagrams from a socket with one recvmmsg.
// With UDP GRO on (NewGROBatch), the kernel may hand it several datagrams of
// one sender in one message, which it splits again: Read and Message see
// every datagram as it was sent. On a socket bound to an unspecified
// address it also reports each datagram's destination address (Dst).
type Batch struct {
	rc      syscall.RawConn
	m       *Msgs
	recvf   func(fd uintptr) bool // b.recv, bound once
	n       int
	errno   syscall.Errno
	bufSize int
	dsts    []netip.Addr // on an unspecified address: each message's destination

	// With GRO:
	mem       []byte     // the mapping of m's buffers
	ds        []datagram // the last Read's datagrams
	coalesced int        // how many of them came coalesced
}

// datagram is a datagram of a message that may hold several.
type datagram struct {
	msg, off, len int32
	truncated     bool
}

// NewBatch returns a reader of up to size datagrams of up to bufSize bytes
// per call; a longer datagram is reported truncated.
func NewBatch(conn *net.UDPConn, size, bufSize int) (*Batch, error) {
	return newBatch(conn, size, bufSize, false)
}

// NewGROBatch is NewBatch with UDP GRO on for the socket, where the system
// has it: the kernel may then deliver a burst of one sender's datagrams of
// one size (sent with UDP GSO, or coalesced on arrival) as one, which costs
// the receiver one message instead of one per datagram, and the batch
// splits it again. Each message has a 64 KiB buffer for a whole burst
// (mapped, backed by memory only as far as bursts reach); the longest
// datagram returned whole is still bufSize. Without UDP GRO it is NewBatch.
func NewGROBatch(conn *net.UDPConn, size, bufSize int) (*Batch, error) {
	return newBatch(conn, size, bufSize, true)
}

func newBatch(conn *net.UDPConn, size, bufSize int, gro bool) (*Batch, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	b := &Batch{rc: rc, bufSize: bufSize}
	b.recvf = b.recv
	if recvDst(conn, rc) {
		b.dsts = make([]netip.Addr, size)
	}
	if gro && b.enableGRO(size) {
		return b, nil
	}
	b.m = NewMsgs(size, bufSize)
	if b.dsts != nil {
		b.m.withControl()
	}
	return b, nil
}

// enableGRO turns UDP GRO on for the socket and gives the batch its
// messages, or reports that the system has no UDP GRO.
func (b *Batch) enableGRO(size int) bool {
	m, mem, err := newGROMsgs(size)
	if err != nil {
		return false
	}
	var serr error
	if err := b.rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1)
	}); err != nil || serr != nil {
		_ = unix.Munmap(mem)
		return false
	}
	b.m, b.mem = m, mem
	b.ds = make([]datagram, 0, size*maxSegments)
	return true
}

// GRO reports whether UDP GRO is on for the batch's socket.
func (b *Batch) GRO() bool { return b.mem != nil }

// Close frees the batch's buffers once it is no longer read.
func (b *Batch) Close() {
	if b.mem != nil {
		_ = unix.Munmap(b.mem)
		b.mem, b.m = nil, nil
	}
}

func (b *Batch) recv(fd uintptr) bool {
	b.n, b.errno = b.m.Recv(fd, 0)
	return b.errno != unix.EAGAIN && b.errno != unix.EINTR // else wait until readable
}

// Read waits for datagrams and returns how many were read.
func (b *Batch) Read() (int, error) {
	if err := b.rc.Read(b.recvf); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	if b.mem == nil {
		if b.dsts != nil {
			for i := range b.n {
				_, b.dsts[i] = b.m.control(i)
			}
		}
		return b.n, nil
	}
	return b.split(), nil
}

// split lists the datagrams of the messages read: a coalesced message's
// segments, all of the reported size but the last, which may be shorter;
// and returns how many there are.
func (b *Batch) split() int {
	b.ds, b.coalesced = b.ds[:0], 0
	for i := range b.n {
		size, truncated := int(b.m.hdrs[i].len), b.m.hdrs[i].hdr.Flags&unix.MSG_TRUNC != 0
		seg, dst := b.m.control(i)
		if b.dsts != nil {
			b.dsts[i] = dst
		}
		if seg <= 0 || seg >= size {
			b.ds = append(b.ds, datagram{int32(i), 0, int32(size), truncated})
			continue
		}
		for off := 0; off < size; off += seg {
			n := min(seg, size-off)
			b.ds = append(b.ds, datagram{int32(i), int32(off), int32(n), truncated && off+n == size})
			b.coalesced++
		}
	}
	return len(b.ds)
}

// Coalesced is how many datagrams of the last Read the kernel had
// coalesced (UDP GRO).
func (b *Batch) Coalesced() int { return b.coalesced }

// Message returns datagram i of the last Read: its source, unmapped, its
// bytes and whether it was cut short.
func (b *Batch) Message(i int) (netip.AddrPort, []byte, bool) {
	if b.mem == nil {
		return b.m.Message(i)
	}
	d := b.ds[i]
	data := b.m.bufs[d.msg][d.off : d.off+d.len : d.off+d.len]
	if len(data) > b.bufSize {
		return addrPort(&b.m.names[d.msg]), data[:b.bufSize], true
	}
	return addrPort(&b.m.names[d.msg]), data, d.truncated
}

// Dst returns the destination address, unmapped, of datagram i of the last
// Read: one of the host's addresses, which a reply to its sender must leave
// from. It is invalid where the socket is bound to one address, which
// replies leave from anyway, or the system did not report it.
func (b *Batch) Dst(i int) netip.Addr {
	switch {
	case b.dsts == nil:
		return netip.Addr{}
	case b.mem == nil:
		return b.dsts[i]
	}
	return b.dsts[b.ds[i].msg]
}
