//go:build !unix

package stabilize

import "net"

// holdSocket keeps no duplicate where descriptors cannot be duplicated: on
// udp/, replies after a reload wait for the client's next datagram.
func holdSocket(*net.UDPConn) (*socketHold, error) { return nil, nil }
