package udpio

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestGrowBuffers: GrowBuffers raises a socket's buffers to the size asked
// for and reports the receive buffer's; a larger buffer stays.
func TestGrowBuffers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("buffers past net.core.rmem_max need CAP_NET_ADMIN")
	}
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sizes := func() (rcv, snd int) {
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		_ = rc.Control(func(fd uintptr) {
			rcv, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
			snd, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
		})
		return rcv / 2, snd / 2 // the kernel reports twice the size
	}
	for _, tc := range []struct{ ask, want int }{
		{6 << 20, 6 << 20},
		{4 << 20, 6 << 20}, // a larger buffer stays
	} {
		got, err := GrowBuffers(c, tc.ask)
		rcv, snd := sizes()
		if err != nil || got != tc.want || rcv != tc.want || snd != tc.want {
			t.Fatalf("asked for %d: reported %d, %v; receive buffer %d, send buffer %d; want %d", tc.ask, got, err, rcv, snd, tc.want)
		}
	}
}
