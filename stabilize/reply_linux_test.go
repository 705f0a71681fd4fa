package stabilize

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A reply reactor that fails to start (EMFILE) leaks no descriptor, and the
// next flow starts one: the failure is not kept for the life of the process.
func TestReactorStartIsRetried(t *testing.T) {
	reactors.Lock()
	started := reactors.list
	reactors.list = nil // as if none had started yet
	reactors.Unlock()
	t.Cleanup(func() {
		reactors.Lock()
		reactors.list = append(started, reactors.list...)
		reactors.Unlock()
	})

	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	before := openFDs(t)
	// A new descriptor takes the lowest free number, which must stay under
	// the limit: with the limit at that number, there is none to spare.
	free, err := unix.Dup(0)
	if err != nil {
		t.Fatal(err)
	}
	_ = unix.Close(free)
	low := lim
	low.Cur = uint64(free)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Skipf("lowering the open-file limit: %v", err)
	}
	_, err = reactorFor()
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(err, unix.EMFILE) {
		t.Fatalf("starting a reactor with no descriptor to spare: %v, want EMFILE", err)
	}
	if n := openFDs(t); n != before {
		t.Errorf("%d descriptors open after the failed start, %d before", n, before)
	}

	for _, network := range []string{"udp", FastNetwork} {
		t.Run(network, func(t *testing.T) {
			a := startUpstream(t, "a")
			lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig("flow", "", a))
			newClient(t, lb.addr).mustRoundTrip("after-emfile")
		})
	}
}

// Replies leave through the listener's own socket, found behind caddy-l4's
// flow, on both networks: never through caddy-l4's blocking cx.Write.
func TestRepliesLeaveThroughListenerSocket(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig("flow", "", a))
		newClient(t, lb.addr).mustRoundTrip("hello")
		h := tr.latest()
		h.mu.Lock()
		defer h.mu.Unlock()
		if len(h.flows) != 1 {
			t.Fatalf("%d flows, want 1", len(h.flows))
		}
		for fl := range h.flows {
			if fl.out == nil || fl.out.LocalAddr().String() != lb.addr {
				t.Fatalf("the flow's replies leave through %v, want the listener socket %s", fl.out, lb.addr)
			}
		}
	})
}

// TestEndedFlowsLeaveReactor: a flow's socket leaves its reactor's epoll
// set when the flow ends, which closing the socket does alone: the kernel
// drops a file's epoll entries once its last descriptor is closed, and no
// other descriptor of a flow's socket exists.
func TestEndedFlowsLeaveReactor(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 300*time.Millisecond, handlerConfig(per, "", a))
		h := tr.latest()
		type watched struct {
			epfd int
			ino  uint64
		}
		var socks []watched
		for i := range 8 {
			cl := newClient(t, lb.addr)
			cl.mustRoundTrip(fmt.Sprint("flow-", i))
			fl := flowOf(t, h, cl)
			var st unix.Stat_t
			if err := unix.Fstat(fl.fd, &st); err != nil {
				t.Fatal(err)
			}
			socks = append(socks, watched{fl.reactor.epfd, st.Ino})
			if !epollWatches(t, fl.reactor.epfd, st.Ino) {
				t.Fatalf("flow %d: its socket is not in its reactor's epoll set", i)
			}
		}
		eventually(t, 5*time.Second, "the flows to end", func() bool {
			h.mu.Lock()
			defer h.mu.Unlock()
			return len(h.flows) == 0
		})
		for i, s := range socks {
			if epollWatches(t, s.epfd, s.ino) {
				t.Errorf("flow %d ended, but its socket is still in its reactor's epoll set", i)
			}
		}
	})
}

// epollWatches reports whether the epoll set epfd has an entry for the file
// with inode ino, from /proc/self/fdinfo.
func epollWatches(t *testing.T, epfd int, ino uint64) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", epfd))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), fmt.Sprintf(" ino:%x ", ino))
}
