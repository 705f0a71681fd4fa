//go:build !linux

package stabilize

import "syscall"

// quicSocketOptions sets nothing: elsewhere quic-go gets no SyscallConn,
// so it sets no socket options and keeps packets at 1280 bytes.
func quicSocketOptions(syscall.RawConn) error { return nil }
