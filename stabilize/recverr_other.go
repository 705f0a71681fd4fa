//go:build !linux

package stabilize

import "net"

// enableICMPErrors does nothing: outside Linux, unconnected UDP sockets are
// not told of ICMP errors, so passive checks rely on reply_timeout.
func enableICMPErrors(*net.UDPConn) error { return nil }

// readErrQueue finds nothing: there is no error queue.
func readErrQueue(*net.UDPConn, []icmpError) (int, error) { return 0, nil }
