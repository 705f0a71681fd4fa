package fastudp

import (
	"os"
	"testing"

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
	if rcv < socketBuffer {
		if os.Geteuid() != 0 {
			t.Skipf("receive buffer %d: capped by net.core.rmem_max without CAP_NET_ADMIN", rcv)
		}
		t.Fatalf("receive buffer is %d bytes, want at least %d", rcv, socketBuffer)
	}
}
