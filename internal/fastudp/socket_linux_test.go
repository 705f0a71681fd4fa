package fastudp

import (
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestSocketBuffers(t *testing.T) {
	f, err := Listen("127.0.0.1:0", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rc, err := f.Socket().Conn().SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var rcv int
	_ = rc.Control(func(fd uintptr) {
		rcv, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
	})
	if rcv < SocketBuffer {
		if os.Geteuid() != 0 {
			t.Skipf("receive buffer %d: capped by net.core.rmem_max without CAP_NET_ADMIN", rcv)
		}
		t.Fatalf("receive buffer is %d bytes, want at least %d", rcv, SocketBuffer)
	}
}

// dstEndpoint records the destinations of its datagrams.
type dstEndpoint struct{ got chan netip.Addr }

func (e *dstEndpoint) Deliver(d Datagram, _ int64) { e.got <- d.Dst }
func (e *dstEndpoint) Expired(int64) bool          { return false }
func (e *dstEndpoint) Close()                      {}

// TestSocketDst: on a socket bound to an unspecified address, with two
// readers, the address a client sent to reaches Dst for caddy-l4's
// datagrams and the endpoint with each datagram; on a bound socket it is
// invalid.
func TestSocketDst(t *testing.T) {
	for _, tc := range []struct{ listen, to, want string }{
		{"0.0.0.0:0", "127.0.0.2", "127.0.0.2"},
		{"0.0.0.0:0", "127.0.0.1", "127.0.0.1"},
		{"127.0.0.1:0", "127.0.0.1", "invalid IP"},
	} {
		f, err := Listen(tc.listen, 2)
		if err != nil {
			t.Fatal(err)
		}
		port := f.LocalAddr().(*net.UDPAddr).Port
		c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.ParseIP(tc.to), Port: port})
		if err != nil {
			t.Fatal(err)
		}
		client := c.LocalAddr().(*net.UDPAddr).AddrPort()
		if _, err := c.Write([]byte("first")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		if _, from, err := f.ReadFrom(buf); err != nil || from.(*net.UDPAddr).AddrPort() != client {
			t.Fatalf("%s: read %v from %v", tc.to, err, from)
		}
		if got := f.Socket().Dst(client); got.String() != tc.want {
			t.Errorf("%s on %s: Dst %v, want %s", tc.to, tc.listen, got, tc.want)
		}
		ep := &dstEndpoint{got: make(chan netip.Addr, 1)}
		f.Socket().Register(client, ep)
		if _, err := c.Write([]byte("second")); err != nil {
			t.Fatal(err)
		}
		select {
		case got := <-ep.got:
			if got.String() != tc.want {
				t.Errorf("%s on %s: delivered with destination %v, want %s", tc.to, tc.listen, got, tc.want)
			}
		case <-time.After(2 * time.Second):
			t.Errorf("%s on %s: nothing delivered", tc.to, tc.listen)
		}
		// caddy-l4's handlers write through the front: from the
		// address the client sent to, which a connected client needs.
		if _, err := f.WriteTo([]byte("reply"), c.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		if n, err := c.Read(buf); err != nil || string(buf[:n]) != "reply" {
			t.Errorf("%s on %s: the front's reply: %q, %v", tc.to, tc.listen, buf[:n], err)
		}
		_ = c.Close()
		_ = f.Close()
	}
}

// TestFrontWriteToKeepsDst: a caddy-l4 handler that keeps writing to a
// client of an unspecified address through the front, after the client's
// last datagram, as a proxied server that pushes does, replies from the
// address the client sent to for as long as it writes, not only in the
// one to two seconds the socket keeps a destination it has not used.
func TestFrontWriteToKeepsDst(t *testing.T) {
	f, err := Listen("0.0.0.0:0", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	port := f.LocalAddr().(*net.UDPAddr).Port
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("subscribe")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	_, from, err := f.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	for i, end := 0, time.Now().Add(3*reapInterval); time.Now().Before(end); i++ {
		if _, err := f.WriteTo([]byte("push"), from); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("push %d, %v after the client's datagram: %v", i, (3*reapInterval - time.Until(end)).Round(time.Millisecond), err)
		}
		time.Sleep(reapInterval / 5)
	}
}
