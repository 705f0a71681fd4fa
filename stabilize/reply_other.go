//go:build !linux

package stabilize

import (
	"errors"
	"net"
	"net/netip"
	"sync"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// replyState is the flow's reply goroutine, where there is no reactor.
type replyState struct {
	done    sync.WaitGroup
	replyMu sync.Mutex // held while a reply is handled
}

// startReplies starts a goroutine that relays fl's replies. A datagram
// longer than the buffer is reported truncated.
func (fl *Flow) startReplies(*listenerInfo) error {
	fl.done.Add(1)
	go func() {
		defer fl.done.Done()
		buf := make([]byte, ListenerBufferSize+1)
		for {
			n, from, err := fl.conn.ReadFromUDPAddrPort(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			fl.replyMu.Lock()
			if err != nil {
				fl.h.socketError(fl, err)
			} else {
				fl.relay(udpio.Unmap(from), buf[:min(n, ListenerBufferSize)], n > ListenerBufferSize)
			}
			fl.replyMu.Unlock()
		}
	}()
	return nil
}

// relay sends one reply to the client. fl.replyMu is held.
func (fl *Flow) relay(from netip.AddrPort, b []byte, truncated bool) {
	if fl.reply(from, b, truncated) == nil {
		return
	}
	if fl.out == nil {
		fl.writeThroughCaddy(b)
		return
	}
	if _, err := fl.out.WriteToUDPAddrPort(b, fl.client); err != nil {
		fl.h.drop(dropWriteError)
	}
}

// setReplySrc does nothing: only Linux reads the address a client sent
// to (IP_PKTINFO), so replies elsewhere leave from the route's address.
func (fl *Flow) setReplySrc(netip.Addr) {}

// stopReplies closes fl's socket and waits for its reply goroutine.
func (fl *Flow) stopReplies() {
	_ = fl.conn.Close()
	fl.done.Wait()
}
