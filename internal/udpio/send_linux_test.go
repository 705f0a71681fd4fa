package udpio

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on a thread in a new network namespace whose loopback
// sends through a slow token bucket, so that a socket's send buffer fills.
// The thread, and the namespace with it, end with fn.
func inNetns(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	if _, err := exec.LookPath("tc"); err != nil {
		t.Skip("needs tc (iproute2)")
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		for _, args := range [][]string{
			{"ip", "link", "set", "lo", "up"},
			{"tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit", "burst", "1600", "limit", "1000000"},
		} {
			if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
				errc <- errors.New(string(out))
				return
			}
		}
		fn()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Skipf("setting up a network namespace: %v", err)
	}
}

// A Sender never waits for a full send buffer: it drops the datagram with
// ErrWouldBlock.
func TestSenderDropsWhenBufferFull(t *testing.T) {
	var sent, blocked int
	var sendErr error
	inNetns(t, func() {
		conn, err := NewBound(unix.AF_INET, netip.MustParseAddr("127.0.0.1"))
		if err != nil {
			sendErr = err
			return
		}
		defer conn.Close()
		_ = conn.SetWriteBuffer(4096)
		s := NewSender(conn)
		to := netip.MustParseAddrPort("127.0.0.1:9")
		b := make([]byte, 1000)
		for range 200 { // at 8 kbit/s, 200 kB would take minutes to drain
			switch err := s.SendTo(b, to); {
			case err == nil:
				sent++
			case errors.Is(err, ErrWouldBlock):
				blocked++
			default:
				sendErr = err
				return
			}
		}
	})
	if sendErr != nil {
		t.Fatal(sendErr)
	}
	if blocked == 0 {
		t.Fatalf("sent %d datagrams into a full buffer without ErrWouldBlock", sent)
	}
	t.Logf("%d sent, %d dropped with ErrWouldBlock", sent, blocked)
}

// Empty datagrams and every size up to a buffer's length pass through a
// SendQueue and Msgs without touching a missing first byte.
func TestBatchEverySize(t *testing.T) {
	rx, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	GrowBuffers(rx, 8<<20)
	tx, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	txRC, _ := tx.SyscallConn()
	const bufSize = 64
	q := NewSendQueue(8)
	in, err := NewBatch(rx, 8, bufSize)
	if err != nil {
		t.Fatal(err)
	}
	to := rx.LocalAddr().(*net.UDPAddr).AddrPort()
	payload := make([]byte, bufSize+1)
	for i := range payload {
		payload[i] = byte(i)
	}
	for size := 0; size <= bufSize+1; size += 8 {
		q.Reset()
		for k := range 8 {
			q.Add(payload[:min(size+k, bufSize+1)], to, Family(txRC))
		}
		var n int
		var errno unix.Errno
		if err := txRC.Write(func(fd uintptr) bool { n, errno = q.Send(fd, 0, q.Len()); return true }); err != nil || errno != 0 || n != 8 {
			t.Fatalf("size %d: sent %d of 8: %v %v", size, n, err, errno)
		}
		for got := 0; got < 8; {
			m, err := in.Read()
			if err != nil {
				t.Fatal(err)
			}
			for i := range m {
				want := min(size+got, bufSize+1)
				_, data, truncated := in.Message(i)
				if truncated != (want > bufSize) || len(data) != min(want, bufSize) {
					t.Fatalf("datagram of %d bytes read as %d bytes, truncated %v", want, len(data), truncated)
				}
				got++
			}
		}
	}
}

// An IPv4 socket asked to send to an IPv6 address fails the send; it never
// panics or reaches a wrong address.
func TestSenderIPv6FromIPv4Socket(t *testing.T) {
	conn, err := NewBound(unix.AF_INET, netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	s := NewSender(conn)
	if err := s.SendTo([]byte("x"), netip.MustParseAddrPort("[2001:db8::1]:9")); err == nil {
		t.Fatal("an IPv4 socket sent to an IPv6 address")
	}
}
