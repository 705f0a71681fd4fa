package stabilize

// writeThroughCaddy sends a reply with caddy-l4's cx.Write, for a listener
// whose socket listenerOf cannot reach. cx.Write blocks while the socket's
// buffer is full. fl.replyMu is held.
func (fl *Flow) writeThroughCaddy(b []byte) {
	cx := fl.cx.Load()
	if cx == nil {
		fl.h.drop(dropWriteError)
		return
	}
	if _, err := cx.Write(b); err != nil {
		fl.h.drop(dropWriteError)
	}
}
