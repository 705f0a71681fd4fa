package udpio

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestPutPktInfo builds the source address's control message of each
// family and reads it back with the x/sys/unix parser and parseControl,
// alone, after a UDP_GRO message and before one, cut short and malformed.
func TestPutPktInfo(t *testing.T) {
	for _, tc := range []struct {
		addr        string
		level, typ  int32
		dataLen     int
		want        string
		specDstAddr bool
	}{
		{"127.0.0.2", unix.IPPROTO_IP, unix.IP_PKTINFO, unix.SizeofInet4Pktinfo, "127.0.0.2", true},
		{"::ffff:10.1.2.3", unix.IPPROTO_IP, unix.IP_PKTINFO, unix.SizeofInet4Pktinfo, "10.1.2.3", true},
		{"2001:db8::7", unix.IPPROTO_IPV6, unix.IPV6_PKTINFO, unix.SizeofInet6Pktinfo, "2001:db8::7", false},
		{"::1", unix.IPPROTO_IPV6, unix.IPV6_PKTINFO, unix.SizeofInet6Pktinfo, "::1", false},
	} {
		c := bytes.Repeat([]byte{0xff}, PktInfoSpace) // no stale bytes may stay
		n := PutPktInfo(c, netip.MustParseAddr(tc.addr))
		if n != unix.CmsgSpace(tc.dataLen) || n > PktInfoSpace {
			t.Fatalf("%s: %d bytes, want CMSG_SPACE(%d) = %d", tc.addr, n, tc.dataLen, unix.CmsgSpace(tc.dataLen))
		}
		msgs, err := unix.ParseSocketControlMessage(c[:n])
		if err != nil || len(msgs) != 1 {
			t.Fatalf("%s: %d messages, %v", tc.addr, len(msgs), err)
		}
		m := msgs[0]
		if m.Header.Level != tc.level || m.Header.Type != tc.typ || len(m.Data) != tc.dataLen {
			t.Fatalf("%s: level %d type %d with %d bytes, want %d %d %d", tc.addr, m.Header.Level, m.Header.Type, len(m.Data), tc.level, tc.typ, tc.dataLen)
		}
		if tc.specDstAddr {
			info := (*unix.Inet4Pktinfo)(unsafe.Pointer(&m.Data[0]))
			if info.Ifindex != 0 || netip.AddrFrom4(info.Spec_dst).String() != tc.want || netip.AddrFrom4(info.Addr).String() != tc.want {
				t.Errorf("%s: in_pktinfo %+v", tc.addr, *info)
			}
		} else {
			info := (*unix.Inet6Pktinfo)(unsafe.Pointer(&m.Data[0]))
			if info.Ifindex != 0 || netip.AddrFrom16(info.Addr).String() != tc.want {
				t.Errorf("%s: in6_pktinfo %+v", tc.addr, *info)
			}
		}

		gro := groMsg(1200)
		for name, buf := range map[string][]byte{
			"alone":      c[:n],
			"after GRO":  append(append([]byte(nil), gro...), c[:n]...),
			"before GRO": append(append([]byte(nil), c[:n]...), gro...),
		} {
			seg, dst := parseControl(buf)
			if dst.String() != tc.want {
				t.Errorf("%s, %s: destination %v, want %s", tc.addr, name, dst, tc.want)
			}
			if wantSeg := 1200 * min(len(buf)-n, 1); seg != wantSeg {
				t.Errorf("%s, %s: segment %d, want %d", tc.addr, name, seg, wantSeg)
			}
		}
		if _, dst := parseControl(c[:unix.CmsgLen(tc.dataLen)-1]); dst.IsValid() {
			t.Errorf("%s: a message cut short gave %v", tc.addr, dst)
		}
		(*unix.Cmsghdr)(unsafe.Pointer(&c[0])).SetLen(unix.CmsgLen(0) - 1)
		if _, dst := parseControl(c[:n]); dst.IsValid() {
			t.Errorf("%s: a malformed message gave %v", tc.addr, dst)
		}
	}
	if n := PutPktInfo(make([]byte, PktInfoSpace), netip.Addr{}); n != 0 {
		t.Errorf("an invalid address took %d bytes", n)
	}
}

// groMsg is a UDP_GRO control message of segment size seg.
func groMsg(seg int) []byte {
	b := make([]byte, unix.CmsgSpace(4))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_GRO
	h.SetLen(unix.CmsgLen(4))
	*(*int32)(unsafe.Pointer(&b[unix.CmsgLen(0)])) = int32(seg)
	return b
}

// listenWild opens a UDP socket on network ("udp4", "udp6" or "udp") at
// the unspecified address, or skips the test where it cannot.
func listenWild(t *testing.T, network, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Skipf("no %s socket at %s: %v", network, addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// dialFrom connects a client socket to port at addr, or skips the test.
func dialFrom(t *testing.T, addr string, port int) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(addr), uint16(port))))
	if err != nil {
		t.Skipf("cannot reach %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// wildCases are sockets bound to unspecified addresses and the host
// addresses their clients send to.
var wildCases = []struct {
	network, listen string
	dsts            []string
}{
	{"udp4", "0.0.0.0:0", []string{"127.0.0.2", "127.0.0.1"}},
	{"udp", "[::]:0", []string{"127.0.0.2", "127.0.0.1", "::1"}}, // dual-stack: mapped IPv4
	{"udp6", "[::]:0", []string{"::1"}},
}

// TestBatchDst checks that a Batch of a socket bound to an unspecified
// address reports each datagram's destination, unmapped, with and without
// UDP GRO, and that a socket bound to one address reports none.
func TestBatchDst(t *testing.T) {
	for _, tc := range wildCases {
		for _, gro := range []bool{false, true} {
			t.Run(tc.network+tc.listen+map[bool]string{false: "", true: "/gro"}[gro], func(t *testing.T) {
				rx := listenWild(t, tc.network, tc.listen)
				in := newTestBatch(t, rx, gro)
				port := rx.LocalAddr().(*net.UDPAddr).Port
				for _, dst := range tc.dsts {
					cl := dialFrom(t, dst, port)
					for range 3 { // GRO may coalesce them
						if _, err := cl.Write([]byte("ping-" + dst)); err != nil {
							t.Skipf("cannot send to %s: %v", dst, err)
						}
					}
					for got := 0; got < 3; {
						n := readBatch(t, rx, in)
						for i := range n {
							src, data, _ := in.Message(i)
							if src != Unmap(cl.LocalAddr().(*net.UDPAddr).AddrPort()) || string(data) != "ping-"+dst {
								t.Fatalf("datagram %q from %v", data, src)
							}
							if d := in.Dst(i); d.String() != dst {
								t.Errorf("destination %v, want %s", d, dst)
							}
						}
						got += n
					}
				}
			})
		}
	}
	t.Run("bound", func(t *testing.T) {
		rx := listenWild(t, "udp4", "127.0.0.1:0")
		in := newTestBatch(t, rx, true)
		cl := dialFrom(t, "127.0.0.1", rx.LocalAddr().(*net.UDPAddr).Port)
		_, _ = cl.Write([]byte("x"))
		if n := readBatch(t, rx, in); n != 1 || in.Dst(0).IsValid() {
			t.Errorf("%d datagrams, destination %v; want 1 with none", n, in.Dst(0))
		}
		if in.m.ctrl != nil && !in.GRO() {
			t.Error("a bound socket's batch has control buffers without GRO")
		}
	})
}

func newTestBatch(t *testing.T, rx *net.UDPConn, gro bool) *Batch {
	t.Helper()
	newBatch := NewBatch
	if gro {
		newBatch = NewGROBatch
	}
	in, err := newBatch(rx, 8, 2048)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(in.Close)
	return in
}

func readBatch(t *testing.T, rx *net.UDPConn, in *Batch) int {
	t.Helper()
	_ = rx.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, err := in.Read()
	if err != nil {
		t.Fatalf("reading: %v", err)
	}
	return n
}

// TestSendQueueFrom sends replies out of a socket bound to an unspecified
// address, with sendmmsg and with UDP GSO, from the address each client
// sent to: a client connected to that address receives them only if they
// come from it. Without a source (Add), a reply to a client of 127.0.0.2
// leaves from 127.0.0.1, and the connected client never sees it.
func TestSendQueueFrom(t *testing.T) {
	for _, tc := range wildCases {
		t.Run(tc.network+tc.listen, func(t *testing.T) {
			srv := listenWild(t, tc.network, tc.listen)
			rc, err := srv.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			family := Family(rc)
			port := srv.LocalAddr().(*net.UDPAddr).Port
			q := NewSendQueue(16)
			for _, dst := range tc.dsts {
				cl := dialFrom(t, dst, port)
				to := Unmap(cl.LocalAddr().(*net.UDPAddr).AddrPort())
				src := netip.MustParseAddr(dst)
				q.Reset()
				for _, p := range []string{"one", "two", "six", "end"} { // one GSO run
					q.AddFrom([]byte(p), to, src, family)
				}
				q.AddFrom([]byte("mmsg"), to, src, family)
				q.AddFrom([]byte("routed"), to, netip.Addr{}, family) // apart from the run: another source
				if run := q.GSORun(0, q.Len()); run != 4 {
					t.Fatalf("GSO run of %d, want 4", run)
				}
				var errno syscall.Errno
				if err := rc.Write(func(fd uintptr) bool {
					if errno = q.SendGSO(fd, 0, 4, 3); errno == 0 {
						_, errno = q.Send(fd, 4, q.Len())
					}
					return true
				}); err != nil || errno != 0 {
					t.Fatalf("sending to %v from %s: %v %v", to, dst, err, errno)
				}
				buf := make([]byte, 64)
				var got []string
				for {
					_ = cl.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
					n, err := cl.Read(buf)
					if err != nil {
						break
					}
					got = append(got, string(buf[:n]))
				}
				want := []string{"one", "two", "six", "end", "mmsg"}
				if dst == "127.0.0.1" || dst == "::1" {
					want = append(want, "routed") // the route's address is the one
				}
				if len(got) != len(want) {
					t.Errorf("client of %s received %q, want %q", dst, got, want)
					continue
				}
				for i := range got {
					if got[i] != want[i] {
						t.Errorf("client of %s received %q, want %q", dst, got, want)
						break
					}
				}
			}
		})
	}
}

// TestParseControlReplySource: the destination parseControl gives is the
// address a reply must leave from: IP_PKTINFO's ipi_spec_dst, not its
// ipi_addr, which for a broadcast or multicast datagram is no source (a
// send from it fails), and before IPV6_PKTINFO's mapped header destination
// on a dual-stack socket; an IPv6 multicast or link-local destination
// gives none.
func TestParseControlReplySource(t *testing.T) {
	v4 := func(spec, addr string) []byte {
		c := make([]byte, PktInfoSpace)
		h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
		info := (*unix.Inet4Pktinfo)(unsafe.Pointer(&c[unix.CmsgLen(0)]))
		info.Ifindex, info.Spec_dst, info.Addr = 1, netip.MustParseAddr(spec).As4(), netip.MustParseAddr(addr).As4()
		return c[:unix.CmsgSpace(unix.SizeofInet4Pktinfo)]
	}
	v6 := func(addr string) []byte { // as received: a mapped address stays
		c := make([]byte, PktInfoSpace)
		h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
		h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
		info := (*unix.Inet6Pktinfo)(unsafe.Pointer(&c[unix.CmsgLen(0)]))
		info.Ifindex, info.Addr = 1, netip.MustParseAddr(addr).As16()
		return c
	}
	for _, tc := range []struct {
		name string
		c    []byte
		want string
	}{
		{"unicast", v4("127.0.0.2", "127.0.0.2"), "127.0.0.2"},
		{"broadcast", v4("127.0.0.1", "127.255.255.255"), "127.0.0.1"},
		{"multicast", v4("192.0.2.2", "239.1.2.3"), "192.0.2.2"},
		{"dual-stack broadcast", append(v4("127.0.0.1", "127.255.255.255"), v6("::ffff:127.255.255.255")...), "127.0.0.1"},
		{"dual-stack broadcast, IPv6 first", append(v6("::ffff:127.255.255.255"), v4("127.0.0.1", "127.255.255.255")...), "127.0.0.1"},
		{"dual-stack unicast", append(v4("127.0.0.2", "127.0.0.2"), v6("::ffff:127.0.0.2")...), "127.0.0.2"},
		{"IPv6 unicast", v6("2001:db8::7"), "2001:db8::7"},
		{"IPv6 multicast", v6("ff02::1"), "invalid IP"},
		{"IPv6 link-local", v6("fe80::1"), "invalid IP"},
		{"IPv4 link-local", v4("169.254.1.2", "169.254.1.2"), "169.254.1.2"},
		{"IPv4 multicast, mapped", v6("::ffff:239.1.2.3"), "invalid IP"},
	} {
		if _, dst := parseControl(tc.c); dst.String() != tc.want {
			t.Errorf("%s: %v, want %s", tc.name, dst, tc.want)
		}
	}
}

// TestSendQueueUnsource: datagrams from a source that is not the host's
// fail (SourceGone), as one GSO run and with sendmmsg; Unsource drops the
// sources of the run, or of the first datagram, and they are sent again
// from the route's address.
func TestSendQueueUnsource(t *testing.T) {
	for _, tc := range wildCases {
		t.Run(tc.network+tc.listen, func(t *testing.T) {
			srv := listenWild(t, tc.network, tc.listen)
			rc, err := srv.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			family := Family(rc)
			port := srv.LocalAddr().(*net.UDPAddr).Port
			cl := dialFrom(t, tc.dsts[len(tc.dsts)-1], port) // 127.0.0.1 or ::1
			to := Unmap(cl.LocalAddr().(*net.UDPAddr).AddrPort())
			gone := netip.MustParseAddr("203.0.113.1") // TEST-NET-3, not the host's
			if to.Addr().Is6() {
				gone = netip.MustParseAddr("2001:db8::1")
			}
			q := NewSendQueue(8)
			for _, p := range []string{"one", "two", "six", "mmsg", "last"} {
				q.AddFrom([]byte(p), to, gone, family)
			}
			send := func(f func(fd uintptr) syscall.Errno) syscall.Errno {
				var errno syscall.Errno
				if err := rc.Write(func(fd uintptr) bool { errno = f(fd); return true }); err != nil {
					t.Fatal(err)
				}
				return errno
			}
			gso := func(fd uintptr) syscall.Errno { return q.SendGSO(fd, 0, 3, 3) }
			mmsg := func(fd uintptr) syscall.Errno { _, errno := q.Send(fd, 3, 5); return errno }
			for _, step := range []struct {
				name     string
				send     func(fd uintptr) syscall.Errno
				from, to int
			}{{"gso", gso, 0, 3}, {"sendmmsg", mmsg, 3, 4}} {
				if errno := send(step.send); !SourceGone(errno) {
					t.Fatalf("%s from %v: %v, want a SourceGone error", step.name, gone, errno)
				}
				if src := q.Unsource(step.from, step.to); src != gone {
					t.Fatalf("%s: Unsource = %v, want %v", step.name, src, gone)
				}
				if src := q.Unsource(step.from, step.to); src.IsValid() {
					t.Fatalf("%s: Unsource again = %v", step.name, src)
				}
			}
			if errno := send(gso); errno != 0 {
				t.Fatalf("gso without source: %v", errno)
			}
			var sent int
			if errno := send(func(fd uintptr) syscall.Errno {
				var errno syscall.Errno
				sent, errno = q.Send(fd, 3, 5)
				return errno
			}); errno != 0 || sent != 1 {
				t.Fatalf("sendmmsg: %d sent, %v; want 1, then the datagram with a source", sent, errno)
			}
			buf := make([]byte, 64)
			var got []string
			for {
				_ = cl.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				n, err := cl.Read(buf)
				if err != nil {
					break
				}
				got = append(got, string(buf[:n]))
			}
			if !slices.Equal(got, []string{"one", "two", "six", "mmsg"}) {
				t.Errorf("received %q, want one two six mmsg", got)
			}
		})
	}
}
