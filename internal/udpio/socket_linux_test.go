package udpio

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A Socket outside the netpoller sends with a Sender, connects, receives
// with recvmmsg on its descriptor, and refuses every use once closed.
func TestSocketRoundTrip(t *testing.T) {
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer peer.Close()
		peerAddr := peer.LocalAddr().(*net.UDPAddr).AddrPort()

		var s *Socket
		if family == unix.AF_INET6 {
			s, err = NewUnbound(family)
			if err == nil {
				err = Connect(s, netip.MustParseAddrPort("127.0.0.1:0"), peerAddr)
			}
		} else {
			s, err = NewBound(family, netip.MustParseAddr("127.0.0.1"))
		}
		if err != nil {
			t.Fatalf("family %d: %v", family, err)
		}
		local := s.LocalAddr()
		if !local.IsValid() || local.Port() == 0 || local.Addr() != netip.MustParseAddr("127.0.0.1") {
			t.Fatalf("family %d: LocalAddr %v", family, local)
		}
		snd := NewSender(s)
		if err := snd.SendTo([]byte("ping"), peerAddr); err != nil {
			t.Fatalf("family %d: SendTo: %v", family, err)
		}
		buf := make([]byte, 64)
		_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := peer.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "ping" || Unmap(from) != local {
			t.Fatalf("family %d: peer read %q from %v, %v; want ping from %v", family, buf[:n], from, err, local)
		}
		if _, err := peer.WriteToUDPAddrPort([]byte("pong"), from); err != nil {
			t.Fatal(err)
		}
		m := NewMsgs(4, 64)
		deadline := time.Now().Add(5 * time.Second)
		var got int
		for time.Now().Before(deadline) {
			k, errno := m.Recv(uintptr(s.FD()), 0)
			if errno == unix.EAGAIN {
				time.Sleep(time.Millisecond)
				continue
			}
			if errno != 0 {
				t.Fatalf("family %d: recvmmsg: %v", family, errno)
			}
			got = k
			break
		}
		if from, data, _ := m.Message(0); got != 1 || string(data) != "pong" || from != peerAddr {
			t.Fatalf("family %d: read %d, %q from %v; want pong from %v", family, got, data, from, peerAddr)
		}

		if err := s.Close(); err != nil {
			t.Fatalf("family %d: Close: %v", family, err)
		}
		if err := s.Close(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("family %d: second Close: %v, want net.ErrClosed", family, err)
		}
		if err := snd.SendTo([]byte("late"), peerAddr); !errors.Is(err, net.ErrClosed) {
			t.Errorf("family %d: SendTo after Close: %v, want net.ErrClosed", family, err)
		}
		if err := Reconnect(s, peerAddr); !errors.Is(err, net.ErrClosed) {
			t.Errorf("family %d: Reconnect after Close: %v, want net.ErrClosed", family, err)
		}
	}
}

// Close during a call closes the descriptor only when the call returns,
// so a call never reaches a number the kernel has given another socket.
func TestSocketCloseDuringCall(t *testing.T) {
	s, err := NewSocket(unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	open := func(fd int) bool {
		_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		return err == nil
	}
	rc, _ := s.SyscallConn()
	fd := s.FD()
	err = rc.Write(func(uintptr) bool {
		if err := s.Close(); err != nil {
			t.Errorf("Close during a call: %v", err)
		}
		if !open(fd) {
			t.Error("Close closed the descriptor under a call in progress")
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if open(fd) {
		t.Error("the descriptor is still open after the call returned")
	}
	if err := rc.Control(func(uintptr) { t.Error("a call after Close ran") }); !errors.Is(err, net.ErrClosed) {
		t.Errorf("a call after Close: %v, want net.ErrClosed", err)
	}
	if err := s.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("a second Close: %v, want net.ErrClosed", err)
	}
}

// A connected Socket's Sender sends to its peer when given no address:
// alone, with sendmmsg and with GSO. An unconnected one refuses.
func TestSenderConnectedPeer(t *testing.T) {
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	peerAddr := peer.LocalAddr().(*net.UDPAddr).AddrPort()
	s, err := NewUnbound(unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := Connect(s, netip.MustParseAddrPort("127.0.0.1:0"), peerAddr); err != nil {
		t.Fatal(err)
	}
	var snd Sender
	snd.Init(s)
	if err := snd.SendTo([]byte("one"), netip.AddrPort{}); err != nil {
		t.Fatalf("SendTo without an address: %v", err)
	}
	q := NewSendQueue(4)
	for _, b := range []string{"two", "three"} { // different sizes: sendmmsg
		q.Add([]byte(b), netip.AddrPort{}, snd.Family())
	}
	if n, err := snd.SendQueued(q, 0, 2, 0); n != 2 || err != nil {
		t.Fatalf("sendmmsg without addresses: %d sent, %v", n, err)
	}
	q.Reset()
	for _, b := range []string{"four", "five"} { // one size: GSO
		q.Add([]byte(b), netip.AddrPort{}, snd.Family())
	}
	if n, err := snd.SendQueued(q, 0, 2, 4); n != 2 || err != nil {
		t.Fatalf("GSO without an address: %d sent, %v", n, err)
	}
	buf := make([]byte, 64)
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	for _, want := range []string{"one", "two", "three", "four", "five"} {
		n, _, err := peer.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("peer read %q, %v; want %q", buf[:n], err, want)
		}
	}

	u, err := NewBound(unix.AF_INET, netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	var usnd Sender
	usnd.Init(u)
	if err := usnd.SendTo([]byte("x"), netip.AddrPort{}); !errors.Is(err, unix.EDESTADDRREQ) {
		t.Errorf("unconnected SendTo without an address: %v, want EDESTADDRREQ", err)
	}
}
