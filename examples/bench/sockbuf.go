//go:build linux

package main

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// sockBuf is the receive and send buffer size of the benchmark's own
// sockets (the echo upstreams and the load generator's flows), so that
// they do not drop what the balancer sends them; see setSockBuf.
const sockBuf = 4 << 20

// sockBufInfo is what setSockBuf got: the receive and send buffer sizes the
// kernel reports (twice what was asked, for its bookkeeping), and whether
// the limits net.core.rmem_max/wmem_max were bypassed (SO_RCVBUFFORCE,
// root only).
type sockBufInfo struct {
	rcv, snd int
	forced   bool
}

func (i sockBufInfo) String() string {
	s := fmt.Sprintf("SO_RCVBUF %d KiB, SO_SNDBUF %d KiB", i.rcv>>10, i.snd>>10)
	if i.forced {
		s += " (forced)"
	}
	return s
}

// setSockBuf sets a socket's receive and send buffers to size: with
// SO_RCVBUFFORCE/SO_SNDBUFFORCE where allowed (as root), otherwise
// SO_RCVBUF/SO_SNDBUF, which the kernel caps at net.core.rmem_max/wmem_max.
func setSockBuf(rc syscall.RawConn, size int) (sockBufInfo, error) {
	var info sockBufInfo
	var serr error
	err := rc.Control(func(fd uintptr) { info, serr = setSockBufFD(int(fd), size) })
	if err == nil {
		err = serr
	}
	return info, err
}

// setSockBufFD is setSockBuf on a socket descriptor.
func setSockBufFD(fd, size int) (sockBufInfo, error) {
	info := sockBufInfo{forced: true}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) != nil {
		info.forced = false
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size); err != nil {
			return info, err
		}
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, size) != nil {
		info.forced = false
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, size); err != nil {
			return info, err
		}
	}
	info.rcv, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	info.snd, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	return info, nil
}
