// Package udpio is the platform code of stabilize's UDP sockets, split by
// mechanism as quic-go splits its sys_conn files: batched receive and send
// (recvmmsg, sendmmsg), non-blocking sends, and socket options. On Linux
// every call is non-blocking and allocation-free; elsewhere it falls back to
// one datagram per call through package net.
package udpio

import "errors"

// ErrWouldBlock reports a send that the socket's buffer could not take now.
// The datagram is dropped, never waited for.
var ErrWouldBlock = errors.New("udpio: socket send buffer full")
