package udpio

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// groPair is a receiving socket with a Batch and a sending socket with a
// SendQueue, on 127.0.0.1.
type groPair struct {
	rx, tx *net.UDPConn
	txRC   syscall.RawConn
	in     *Batch
	q      *SendQueue
	to     netip.AddrPort

	segment int                   // of the next send; 0: sendmmsg
	sent    int                   // by the last send
	errno   unix.Errno            // of the last send
	sendf   func(fd uintptr) bool // p.sendFD, bound once
}

func newGROPair(t testing.TB, size, bufSize int, gro bool) *groPair {
	t.Helper()
	p := &groPair{q: NewSendQueue(128)}
	p.sendf = p.sendFD
	var err error
	if p.rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.rx.Close() })
	GrowBuffers(p.rx, 8<<20)
	if p.tx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.tx.Close() })
	p.txRC, _ = p.tx.SyscallConn()
	newBatch := NewBatch
	if gro {
		newBatch = NewGROBatch
	}
	if p.in, err = newBatch(p.rx, size, bufSize); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.in.Close)
	if p.in.GRO() != gro {
		t.Fatalf("UDP GRO is %v, want %v", p.in.GRO(), gro)
	}
	p.to = p.rx.LocalAddr().(*net.UDPAddr).AddrPort()
	return p
}

func (p *groPair) sendFD(fd uintptr) bool {
	if p.segment > 0 {
		p.errno = p.q.SendGSO(fd, 0, p.q.Len(), p.segment)
		p.sent = p.q.Len()
	} else {
		p.sent, p.errno = p.q.Send(fd, 0, p.q.Len())
	}
	return true
}

// send sends ds to the receiver: as one UDP GSO datagram of segment-byte
// segments, or with sendmmsg when segment is 0.
func (p *groPair) send(t testing.TB, ds [][]byte, segment int) {
	p.q.Reset()
	for _, d := range ds {
		p.q.Add(d, p.to, unix.AF_INET)
	}
	p.segment = segment
	if err := p.txRC.Write(p.sendf); err != nil || p.errno != 0 || p.sent != len(ds) {
		t.Fatalf("sent %d of %d: %v %v", p.sent, len(ds), err, p.errno)
	}
}

// segments returns n datagrams of size bytes, the last of last bytes, each
// with its own content.
func segments(tag string, n, size, last int) [][]byte {
	ds := make([][]byte, n)
	for i := range ds {
		l := size
		if i == n-1 {
			l = last
		}
		ds[i] = bytes.Repeat(fmt.Appendf(nil, "%s%03d.", tag, i), l)[:l]
	}
	return ds
}

// With UDP GRO on, a burst sent with UDP GSO is read as one message and
// split into the datagrams sent, each whole, in order; a datagram longer
// than the batch's buffer size, in a burst or alone, is cut to it and
// reported truncated, as without GRO; plain datagrams pass as they are.
func TestBatchGRO(t *testing.T) {
	const bufSize = 1500
	p := newGROPair(t, 8, bufSize, true)
	rc, _ := p.rx.SyscallConn()
	var on int
	_ = rc.Control(func(fd uintptr) { on, _ = unix.GetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO) })
	if on != 1 {
		t.Fatalf("UDP_GRO is %d on the socket, want 1", on)
	}
	type sent struct {
		ds      [][]byte
		segment int
	}
	long := segments("long", 3, 2000, 10)
	plain := [][]byte{[]byte("plain"), {}, bytes.Repeat([]byte("x"), bufSize+1)}
	for _, s := range []sent{
		{segments("a", 10, 100, 37), 100},
		{plain, 0},
		{segments("b", 5, 1200, 1200), 1200},
		{long, 2000},
		{segments("c", 64, 1000, 1), 1000},
	} {
		p.send(t, s.ds, s.segment)
		coalesced := 0
		for got := 0; got < len(s.ds); {
			n, err := p.in.Read()
			if err != nil {
				t.Fatal(err)
			}
			coalesced += p.in.Coalesced()
			for i := range n {
				src, data, truncated := p.in.Message(i)
				want := s.ds[got]
				if src != p.tx.LocalAddr().(*net.UDPAddr).AddrPort() {
					t.Fatalf("datagram %d from %v", got, src)
				}
				if truncated != (len(want) > bufSize) || !bytes.Equal(data, want[:min(len(want), bufSize)]) {
					t.Fatalf("datagram %d of %d bytes read as %d bytes (truncated %v): %.20q…, want %.20q…", got, len(want), len(data), truncated, data, want)
				}
				got++
			}
		}
		if wantCoalesced := len(s.ds) * min(s.segment, 1); coalesced != wantCoalesced {
			t.Errorf("%d datagrams read coalesced, want %d", coalesced, wantCoalesced)
		}
	}
}

// With UDP GRO on, bursts split whatever other control messages the
// socket asked for: quic-go's IP_TOS and IP_PKTINFO, which the kernel
// writes after UDP_GRO, and a timestamp, which it writes before.
func TestBatchGROWithOtherCmsgs(t *testing.T) {
	for _, c := range []struct {
		name     string
		opts     [][2]int // level, option
		groFirst bool     // the kernel writes UDP_GRO first
	}{
		{"tos+pktinfo", [][2]int{{unix.IPPROTO_IP, unix.IP_RECVTOS}, {unix.IPPROTO_IP, unix.IP_PKTINFO}}, true},
		{"timestamp+tos+pktinfo", [][2]int{{unix.SOL_SOCKET, unix.SO_TIMESTAMP}, {unix.SOL_SOCKET, unix.SO_RXQ_OVFL},
			{unix.IPPROTO_IP, unix.IP_RECVTOS}, {unix.IPPROTO_IP, unix.IP_PKTINFO}}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := newGROPair(t, 8, 1500, true)
			rc, _ := p.rx.SyscallConn()
			var serr error
			_ = rc.Control(func(fd uintptr) {
				for _, o := range c.opts {
					if err := unix.SetsockoptInt(int(fd), o[0], o[1], 1); err != nil {
						serr = fmt.Errorf("option %d/%d: %w", o[0], o[1], err)
					}
				}
			})
			if serr != nil {
				t.Fatal(serr)
			}
			ds := segments("a", 10, 100, 37)
			p.send(t, ds, 100)
			for got := 0; got < len(ds); {
				n, err := p.in.Read()
				if err != nil {
					t.Fatal(err)
				}
				if got == 0 {
					m := p.in.m
					cmsgs, err := unix.ParseSocketControlMessage(m.ctrl[:m.hdrs[0].hdr.Controllen])
					if err != nil || len(cmsgs) < 3 { // UDP_GRO, IP_TOS, IP_PKTINFO, maybe more
						t.Fatalf("control messages %+v, %v: want UDP_GRO and the options'", cmsgs, err)
					}
					if first := cmsgs[0].Header; (first.Level == unix.SOL_UDP && first.Type == unix.UDP_GRO) != c.groFirst {
						t.Fatalf("the first control message is %d/%d: UDP_GRO first is %v, want %v", first.Level, first.Type, !c.groFirst, c.groFirst)
					}
				}
				for i := range n {
					_, data, truncated := p.in.Message(i)
					if truncated || !bytes.Equal(data, ds[got]) {
						t.Fatalf("datagram %d of %d bytes read as %d bytes (truncated %v)", got, len(ds[got]), len(data), truncated)
					}
					got++
				}
			}
		})
	}
}

// With UDP GRO on, as without it (TestBatchEverySize), every size passes as
// sent, or cut to the buffer size and reported truncated past it.
func TestBatchEverySizeGRO(t *testing.T) {
	const bufSize = 64
	p := newGROPair(t, 8, bufSize, true)
	payload := make([]byte, bufSize+1)
	for i := range payload {
		payload[i] = byte(i)
	}
	for size := 0; size <= bufSize+1; size += 8 {
		ds := make([][]byte, 8)
		for k := range ds {
			ds[k] = payload[:min(size+k, bufSize+1)]
		}
		p.send(t, ds, 0)
		for got := 0; got < len(ds); {
			n, err := p.in.Read()
			if err != nil {
				t.Fatal(err)
			}
			for i := range n {
				want := len(ds[got])
				_, data, truncated := p.in.Message(i)
				if truncated != (want > bufSize) || len(data) != min(want, bufSize) {
					t.Fatalf("datagram of %d bytes read as %d bytes, truncated %v", want, len(data), truncated)
				}
				got++
			}
		}
	}
}

// BenchmarkBatchGRO sends bursts of 16 datagrams of 1200 bytes with UDP
// GSO and reads them, with UDP GRO on and off at the receiver: on loopback
// the sender's system call delivers, so an operation is the burst's whole
// path, the kernel splitting it for the receiver without GRO. 0 allocs/op.
func BenchmarkBatchGRO(b *testing.B) {
	ds := segments("d", 16, 1200, 1200)
	for _, gro := range []bool{false, true} {
		b.Run(map[bool]string{false: "plain", true: "gro"}[gro], func(b *testing.B) {
			p := newGROPair(b, 64, 9000, gro)
			for b.Loop() {
				p.send(b, ds, 1200)
				for got := 0; got < len(ds); {
					n, err := p.in.Read()
					if err != nil {
						b.Fatal(err)
					}
					for i := range n {
						_, data, _ := p.in.Message(i)
						got += len(data) / 1200
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(ds)), "ns/datagram")
		})
	}
}
