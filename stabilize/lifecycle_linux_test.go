package stabilize

import (
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// When no socket can be opened for a new flow (EMFILE), the flow is refused
// and its datagrams counted as socket_unavailable, established flows keep
// every round trip, and new flows work again once descriptors are free.
func TestNoSocketForANewFlow(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, lb, h := startWithOne(t, network, per, nil)
		good := newClient(t, lb.addr)
		good.mustRoundTrip("before")
		late := newClient(t, lb.addr) // its socket exists before the limit

		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
		free, err := unix.Dup(0)
		if err != nil {
			t.Fatal(err)
		}
		_ = unix.Close(free)
		low := lim
		low.Cur = uint64(free) // no descriptor to spare
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
			t.Skipf("lowering the open-file limit: %v", err)
		}
		_, err = late.conn.Write([]byte("refused"))
		refused := waitUntil(2*time.Second, func() bool { return h.Drops()["socket_unavailable"] >= 1 })
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
		if err != nil || !refused {
			t.Fatalf("a flow with no socket to open was not counted as socket_unavailable (write: %v)", err)
		}
		if a.gotPayload("refused") != 0 {
			t.Error("a refused flow's datagram reached the upstream")
		}
		for i := range 20 {
			good.mustRoundTrip(fmt.Sprintf("still-%d", i))
		}
		newClient(t, lb.addr).mustRoundTrip("a new flow once descriptors are free")
	})
}
