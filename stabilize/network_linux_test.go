package stabilize

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestFastSocketBuffers(t *testing.T) {
	a := startUpstream(t, "a")
	lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, handlerConfig("", "", a))
	s, _ := fastByLocal.Load(lb.addr)
	var rcv int
	_ = s.(*fastSocket).rc.Control(func(fd uintptr) {
		rcv, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
	})
	if rcv < fastSocketBuffer {
		if os.Geteuid() != 0 {
			t.Skipf("receive buffer %d: capped by net.core.rmem_max without CAP_NET_ADMIN", rcv)
		}
		t.Fatalf("fast socket receive buffer is %d bytes, want at least %d", rcv, fastSocketBuffer)
	}
}
