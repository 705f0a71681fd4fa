package fastudp

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// sendGSO sends ds from c, a connected socket, as one UDP GSO datagram of
// len(ds[0])-byte segments.
func sendGSO(t *testing.T, c *net.UDPConn, ds []string) {
	t.Helper()
	q := udpio.NewSendQueue(len(ds))
	for _, d := range ds {
		q.Add([]byte(d), netip.AddrPort{}, unix.AF_INET)
	}
	rc, _ := c.SyscallConn()
	var errno unix.Errno
	if err := rc.Write(func(fd uintptr) bool { errno = q.SendGSO(fd, 0, q.Len(), len(ds[0])); return true }); err != nil || errno != 0 {
		t.Fatalf("GSO send: %v %v", err, errno)
	}
}

func burst(tag string, n int) []string {
	ds := make([]string, n)
	for i := range ds {
		ds[i] = fmt.Sprintf("%s-%03d", tag, i)
	}
	ds[n-1] = ds[n-1][:3] // shorter
	return ds
}

// The socket reads with UDP GRO on, and splits a client's burst, sent with
// UDP GSO and read as one, into the datagrams sent before delivery: a
// registered client's reach its endpoint in order, and a new client's
// reach caddy-l4 one by one, in order.
func TestGRO(t *testing.T) {
	f, err := Listen("127.0.0.1:0", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := f.Socket()
	rc, _ := s.Conn().SyscallConn()
	var on int
	_ = rc.Control(func(fd uintptr) { on, _ = unix.GetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO) })
	if on != 1 {
		t.Fatalf("UDP_GRO is %d on the socket, want 1", on)
	}
	to := s.Conn().LocalAddr().(*net.UDPAddr)
	dial := func() *net.UDPConn {
		c, err := net.DialUDP("udp", nil, to)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}

	// A new client: its first datagrams come as one burst.
	c := dial()
	first := burst("new", 20)
	sendGSO(t, c, first)
	buf := make([]byte, BufferSize)
	for i, want := range first {
		n, from, err := f.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(buf[:n]); got != want || from.String() != c.LocalAddr().String() {
			t.Fatalf("new client: datagram %d is %q from %v, want %q from %v", i, got, from, want, c.LocalAddr())
		}
	}

	// Registered: bursts and a plain datagram, to one endpoint.
	ep := &recorder{}
	s.Register(c.LocalAddr().(*net.UDPAddr).AddrPort(), ep)
	var want []string
	for k := range 3 {
		ds := burst(fmt.Sprintf("b%d", k), 10+k*20)
		sendGSO(t, c, ds)
		want = append(want, ds...)
		if _, err := c.Write([]byte("plain")); err != nil {
			t.Fatal(err)
		}
		want = append(want, "plain")
	}
	waitFor(t, func() bool { got, _ := ep.snapshot(); return len(got) >= len(want) })
	got, calls := ep.snapshot()
	if !slices.Equal(got, want) {
		t.Fatalf("endpoint got %q, want %q", got, want)
	}
	if slices.Contains(calls, -1) {
		t.Errorf("endpoint got datagrams before Warm: %v", calls)
	}
	if n, least := s.Coalesced(), uint64(len(first)+len(want)-3); n < least {
		t.Errorf("%d datagrams read coalesced, want at least %d", n, least)
	}
}
