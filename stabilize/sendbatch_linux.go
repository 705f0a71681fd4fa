package stabilize

import (
	"errors"
	"sync"

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
	sb.q.Add(b, u.addr, fl.send.Family())
}

// flush sends sb's datagrams with sendmmsg, counts them, and empties sb. A
// datagram the socket cannot take now is dropped and counted. fl.mu is held.
func (fl *Flow) flush(sb *sendBatch) {
	n := sb.q.Len()
	for from := 0; from < n; {
		sent, err := fl.send.SendQueued(sb.q, from)
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

// release returns sb to the pool.
func (sb *sendBatch) release() { sendBatches.Put(sb) }
