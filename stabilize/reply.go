package stabilize

// writeThroughCaddy sends a reply with caddy-l4's cx.Write, for a listener
// whose socket listenerOf cannot reach. cx.Write blocks while the socket's
// buffer is full. fl.replyMu is held.
func (fl *Flow) writeThroughCaddy(b []byte) {
	if _, err := fl.cx.Write(b); err != nil {
		fl.h.drop(dropWriteError)
	}
}
