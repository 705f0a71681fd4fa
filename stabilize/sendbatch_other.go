//go:build !linux

package stabilize

// sendBatch is Linux-only (sendmmsg): elsewhere each datagram is sent alone.
type sendBatch struct{}

func newSendBatch() *sendBatch { return nil }

func (*Flow) queue(*sendBatch, []byte, *Upstream) {}
func (*Flow) flush(*sendBatch)                    {}
func (*sendBatch) release()                       {}
