package stabilize

import (
	"errors"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// sendBatchSize is how many datagrams one sendmmsg of a flow sends at most:
// a fastudp read batch's.
const sendBatchSize = 64

// sendBatch gathers the datagrams of one flow from one fastudp read batch,
// to leave with one sendmmsg. Batches are pooled, not kept per flow, so an
// idle flow holds none.
type sendBatch struct {
	q   *udpio.SendQueue
	ups [sendBatchSize]*Upstream
}

var sendBatches = sync.Pool{New: func() any { return &sendBatch{q: udpio.NewSendQueue(sendBatchSize)} }}

// newSendBatch returns an empty batch for several datagrams.
func newSendBatch() *sendBatch { return sendBatches.Get().(*sendBatch) }

// queue adds b, for u, to sb, sending sb first if it is full. fl.mu is held.
func (fl *Flow) queue(sb *sendBatch, b []byte, u *Upstream) {
	if sb.q.Len() == sendBatchSize {
		fl.flush(sb)
	}
	sb.ups[sb.q.Len()] = u
	sb.q.Add(b, fl.sendAddr(u), fl.send.Family())
}

// flush sends sb's datagrams with sendmmsg, counts them, and empties sb. A
// datagram the socket cannot take now is dropped and counted. fl.mu is held.
func (fl *Flow) flush(sb *sendBatch) {
	n := sb.q.Len()
	for from := 0; from < n; {
		end, segment := sb.q.NextRun(from, n, !gsoOff.Load())
		sent, err := fl.send.SendQueued(sb.q, from, end, segment)
		if segment > 0 && err != nil && !errors.Is(err, udpio.ErrWouldBlock) {
			// Segments too large for the route, say: sendmmsg this time,
			// and from now on if the system has no GSO.
			gsoFailed(err)
			sent, err = fl.send.SendQueued(sb.q, from, end, 0)
		}
		switch {
		case err == nil:
			for i, u := range sb.ups[from : from+sent] {
				u.host.datagramsSent.Add(1)
				u.host.bytesSent.Add(uint64(sb.q.Size(from + i)))
			}
			from += sent
		case errors.Is(err, udpio.ErrWouldBlock):
			for range n - from {
				fl.h.drop(dropSendBufferFull)
			}
			from = n
		default:
			fl.h.drop(dropWriteError)
			from++
		}
	}
	clear(sb.ups[:n])
	sb.q.Reset()
}

// gsoOff turns UDP GSO off, after a send with it failed for want of it.
var gsoOff atomic.Bool

// gsoFailed turns UDP GSO off if err says the system has none.
func gsoFailed(err error) {
	if errors.Is(err, syscall.EIO) || errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOPROTOOPT) {
		gsoOff.Store(true)
	}
}

// release returns sb to the pool.
func (sb *sendBatch) release() { sendBatches.Put(sb) }
