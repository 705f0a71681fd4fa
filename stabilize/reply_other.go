//go:build !linux

package stabilize

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"syscall"
)

// replyState is the flow's reply goroutine, where there is no reactor.
type replyState struct {
	done sync.WaitGroup
}

// startReplies starts a goroutine that relays fl's replies.
func (fl *Flow) startReplies() error {
	fl.done.Add(1)
	go func() {
		defer fl.done.Done()
		buf := make([]byte, ListenerBufferSize)
		for {
			n, _, flags, from, err := fl.conn.ReadMsgUDPAddrPort(buf, nil)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				fl.h.socketError(fl, err)
				continue
			}
			from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
			if fl.reply(from, n, flags&syscall.MSG_TRUNC != 0) != nil {
				fl.writeToClient(buf[:n])
			}
		}
	}()
	return nil
}

// stopReplies closes fl's socket and waits for its reply goroutine.
func (fl *Flow) stopReplies() {
	_ = fl.conn.Close()
	fl.done.Wait()
}
